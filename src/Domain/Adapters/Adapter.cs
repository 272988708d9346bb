namespace FineTune.Domain.Adapters;

/// <summary>A trained adapter version: a folder of files under the artifact root, registered by the job that made it.</summary>
public sealed class Adapter
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid TenantId { get; init; }
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
}

/// <summary>One file of an adapter, relative to its folder.</summary>
public sealed record AdapterFile(string Path, long Size, string Sha256);
