using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Quartz;

namespace FineTune.Domain.Dispatch;

/// <summary>
/// Dispatch on Quartz.NET 4's clustered Postgres store: one durable-less job per fine-tune, keyed by the job id
/// (so a second enqueue is a no-op), whose trigger's execution group is the GPU pool (so only nodes serving the
/// pool acquire it), with recovery requested (so a node that dies hands the job to a live one).
/// </summary>
public sealed class QuartzJobDispatcher(ISchedulerFactory schedulers) : IJobDispatcher
{
    public const string JobGroup = "fine-tunes";
    public const string JobIdKey = "jobId";

    public static JobKey KeyOf(Guid jobId) => new(jobId.ToString(), JobGroup);

    public async Task EnqueueAsync(Guid jobId, string pool, int priority, CancellationToken ct)
    {
        var scheduler = await schedulers.GetScheduler(ct);
        var job = JobBuilder.Create<FineTuneQuartzJob>()
            .WithIdentity(KeyOf(jobId))
            .UsingJobData(JobIdKey, jobId.ToString())
            .RequestRecovery()
            .Build();
        var trigger = TriggerBuilder.Create()
            .WithIdentity(jobId.ToString(), JobGroup)
            .ForJob(job)
            .WithExecutionGroup(pool)
            .WithPriority(priority)
            .StartNow()
            .Build();
        try
        {
            await scheduler.ScheduleJob(job, trigger, new ScheduleJobOptions(), ct);
        }
        catch (ObjectAlreadyExistsException)
        {
            // Already scheduled (a retried submit or the reconciler racing the API): nothing to do.
        }
    }

    public async Task InterruptAsync(Guid jobId, CancellationToken ct)
    {
        var scheduler = await schedulers.GetScheduler(ct);
        await scheduler.Interrupt(KeyOf(jobId), ct);
    }

    /// <summary>Whether a trigger for the job is still stored (queued or running).</summary>
    public async Task<bool> IsScheduledAsync(Guid jobId, CancellationToken ct)
    {
        var scheduler = await schedulers.GetScheduler(ct);
        return await scheduler.Exists(KeyOf(jobId), ct);
    }
}

/// <summary>
/// The Quartz job: a thin shell that hands the job id to the worker's <see cref="IJobRunner"/>. It lives here, not in
/// the worker, so that the API can schedule it by type without loading the worker (which loads libtorch).
/// </summary>
public sealed class FineTuneQuartzJob(IJobRunner runner) : IJob
{
    public async ValueTask Execute(IJobExecutionContext context, CancellationToken cancellationToken = default)
    {
        var jobId = Guid.Parse(context.MergedJobDataMap.GetString(QuartzJobDispatcher.JobIdKey)!);
        await runner.RunAsync(jobId, context.Recovering, cancellationToken);
    }
}

/// <summary>Runs one fine-tune job to an end state (implemented by the worker). Must not throw for job failures:
/// those are recorded on the job; an exception means the node itself could not proceed.</summary>
public interface IJobRunner
{
    Task RunAsync(Guid jobId, bool recovering, CancellationToken ct);
}
