using FineTune.Domain.Dispatch;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Npgsql;

namespace FineTune.Worker.Runner;

/// <summary>
/// Closes the gap between our table and Quartz's: the API inserts the job and then schedules it in a second step,
/// so a crash or database blip in between leaves a queued job without a trigger; and a job whose runner vanished
/// without Quartz noticing (lease expired, trigger gone) would sit as running forever. Every interval, each worker
/// re-enqueues such jobs (enqueue is idempotent per job id, so several workers doing this at once is harmless).
/// </summary>
public sealed class Reconciler(NpgsqlDataSource db, QuartzJobDispatcher dispatcher, IOptions<WorkerOptions> options,
    ILogger<Reconciler> log) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken ct)
    {
        var o = options.Value;
        while (!ct.IsCancellationRequested)
        {
            try { await Task.Delay(o.ReconcileInterval, ct); }
            catch (OperationCanceledException) { return; }
            try
            {
                await using var cmd = db.CreateCommand("""
                    SELECT id, pool, priority FROM fine_tune_jobs
                     WHERE (status = 'queued' AND created_at < now() - interval '10 seconds')
                        OR (status = 'running' AND heartbeat_at < now() - @timeout)
                     ORDER BY created_at LIMIT 200
                    """);
                cmd.Parameters.AddWithValue("timeout", o.LeaseTimeout);
                var stale = new List<(Guid Id, string Pool, int Priority)>();
                await using (var r = await cmd.ExecuteReaderAsync(ct))
                    while (await r.ReadAsync(ct)) stale.Add((r.GetGuid(0), r.GetString(1), r.GetInt32(2)));
                foreach (var (id, pool, priority) in stale)
                {
                    if (await dispatcher.IsScheduledAsync(id, ct)) continue;
                    log.LogWarning("Job {JobId} had no Quartz trigger; enqueuing it again", id);
                    await dispatcher.EnqueueAsync(id, pool, priority, ct);
                }
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested) { return; }
            catch (Exception e) when (e is NpgsqlException or Quartz.SchedulerException)
            {
                log.LogWarning(e, "Reconciliation pass failed; trying again later");
            }
        }
    }
}
