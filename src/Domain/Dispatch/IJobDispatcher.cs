namespace FineTune.Domain.Dispatch;

/// <summary>Hands jobs to the worker cluster. Our fine_tune_jobs table stays the source of truth; this only says where and when.</summary>
public interface IJobDispatcher
{
    /// <summary>Schedules the job to run on a node serving <paramref name="pool"/>. Idempotent per job id.</summary>
    Task EnqueueAsync(Guid jobId, string pool, int priority, CancellationToken ct);
    /// <summary>Asks whichever node runs the job to cancel it (cooperative: the training loop checks its token every step).</summary>
    Task InterruptAsync(Guid jobId, CancellationToken ct);
}
