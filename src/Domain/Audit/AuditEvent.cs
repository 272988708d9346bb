namespace FineTune.Domain.Audit;

/// <summary>Who did what to which object, and when. Written in the transaction of the change it records.</summary>
public sealed class AuditEvent
{
    public long Id { get; init; }
    public DateTimeOffset At { get; init; } = Jobs.Clock.Now();
    /// <summary>The tenant whose object it is.</summary>
    public Guid TenantId { get; init; }
    public Guid? ActorTenantId { get; init; }
    /// <summary>The API key that acted (null: the service itself).</summary>
    public Guid? ActorKeyId { get; init; }
    public string? ActorRole { get; init; }
    /// <summary>e.g. job.created, job.cancelled, alias.moved, adapter.deleted (see <see cref="AuditActions"/>).</summary>
    public required string Action { get; init; }
    public required string TargetType { get; init; }
    public required string TargetId { get; init; }
    /// <summary>Details as jsonb text (before/after of a change).</summary>
    public string? Data { get; init; }
}

public static class AuditActions
{
    public const string TenantCreated = "tenant.created", TenantUpdated = "tenant.updated",
        KeyCreated = "key.created", KeyRevoked = "key.revoked",
        JobCreated = "job.created", JobCancelled = "job.cancelled",
        AliasMoved = "alias.moved", AliasDeleted = "alias.deleted",
        AdapterTagsChanged = "adapter.tags_changed", AdapterDeleted = "adapter.deleted",
        AdapterRestored = "adapter.restored", AdapterPurged = "adapter.purged",
        WebhookCreated = "webhook.created", WebhookUpdated = "webhook.updated", WebhookDeleted = "webhook.deleted";
}
