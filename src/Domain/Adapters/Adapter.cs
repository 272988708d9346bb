namespace FineTune.Domain.Adapters;

/// <summary>
/// A trained adapter version: a folder of files under the artifact root, registered by the job that made it. The
/// content is immutable; tags change, and the row is soft-deleted, then purged (files removed), never removed, so
/// that a version number is never given twice.
/// </summary>
public sealed class Adapter
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid TenantId { get; init; }
    /// <summary>The task: the job's adapterName.</summary>
    public required string Name { get; init; }
    /// <summary>1, 2, … per (tenant, name); the unique index settles races between two jobs finishing at once.</summary>
    public int Version { get; init; }
    public Guid? JobId { get; init; }
    public required string MethodType { get; init; }
    public required string BaseModel { get; init; }
    /// <summary>The adapter folder: absolute, or relative to the artifact root (Storage:ArtifactRoot).</summary>
    public required string Path { get; init; }
    public List<AdapterFile> Files { get; init; } = [];
    public Dictionary<string, object?> Metadata { get; init; } = [];
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();

    public List<string> Tags { get; set; } = [];
    // Lineage, as columns so that the registry can be searched by them (metadata.json holds the same and more).
    /// <summary>The method spec as JSON text (jsonb).</summary>
    public string? Method { get; init; }
    /// <summary>The hyperparameters as JSON text (jsonb).</summary>
    public string? Hyperparameters { get; init; }
    /// <summary>See <see cref="Lineage.BaseModelChecksum"/>.</summary>
    public string? BaseModelSha256 { get; init; }
    public string? DatasetUri { get; init; }
    public string? DatasetSha256 { get; init; }
    public string? ValidationDatasetUri { get; init; }
    public double? FinalLoss { get; init; }
    public double? FinalValidationLoss { get; init; }
    public long SizeBytes { get; init; }
    public DateTimeOffset? DeletedAt { get; set; }
    public DateTimeOffset? PurgedAt { get; set; }
}

/// <summary>One file of an adapter, relative to its folder.</summary>
public sealed record AdapterFile(string Path, long Size, string Sha256);

/// <summary>A movable name (production, staging) for one version of a task.</summary>
public sealed class AdapterAlias
{
    public Guid TenantId { get; init; }
    public required string Task { get; init; }
    public required string Alias { get; init; }
    public Guid AdapterId { get; set; }
    public int Version { get; set; }
    public DateTimeOffset UpdatedAt { get; set; } = Jobs.Clock.Now();
    /// <summary>The API key that moved it last.</summary>
    public Guid? UpdatedBy { get; set; }
}
