using System.Text.Json;
using FineTune.Domain.Persistence;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Domain.Jobs;

/// <summary>The lease a runner holds on a job: every write below is fenced on its generation.</summary>
public sealed record JobLease(Guid JobId, string Owner, long Generation, int Attempt);

public enum LeaseState { Held, CancelRequested, Lost }

/// <summary>
/// What the job runner writes, each fenced on its lease: a runner that lost its lease (another node claimed the job
/// after a stall) changes nothing and learns it from the return value, so two runners never both record results.
/// </summary>
public static class JobLeases
{
    /// <summary>
    /// Claims a queued job, or a running one whose heartbeat is older than <paramref name="staleAfter"/>, with a
    /// conditional update (xmin): of two concurrent claimers exactly one wins. Null when the job is gone, finished,
    /// cancel-requested, held by a live lease, or claimed by someone else meanwhile. Like the other methods here it
    /// clears the context's change tracker (values must come fresh from the row): give the runner its own context.
    /// </summary>
    public static async Task<JobLease?> TryClaimAsync(this FineTuneDbContext db, Guid jobId, string owner,
        TimeSpan staleAfter, CancellationToken ct)
    {
        db.ChangeTracker.Clear();
        var job = await db.Jobs.FirstOrDefaultAsync(j => j.Id == jobId, ct);
        var now = Clock.Now();
        if (job is null || !job.IsClaimable(now, staleAfter)) return null;
        job.Reclaim(owner, $"lease of {job.LeaseOwner} went stale", now);
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateConcurrencyException)
        {
            db.ChangeTracker.Clear();
            return null;
        }
        return new JobLease(job.Id, owner, job.LeaseGeneration, job.Attempt);
    }

    /// <summary>Refreshes the heartbeat; says whether the lease still holds and whether a cancel was requested.</summary>
    public static async Task<LeaseState> HeartbeatAsync(this FineTuneDbContext db, JobLease lease, CancellationToken ct)
    {
        var now = Clock.Now();
        var rows = await db.Database.SqlQuery<bool>($"""
            UPDATE fine_tune_jobs SET heartbeat_at = {now}, updated_at = {now}
            WHERE id = {lease.JobId} AND lease_generation = {lease.Generation} AND status = 'running'
            RETURNING cancel_requested AS "Value"
            """).ToListAsync(ct);
        return rows.Count == 0 ? LeaseState.Lost : rows[0] ? LeaseState.CancelRequested : LeaseState.Held;
    }

    /// <summary>Sets the planned number of steps and the dataset facts once they are known.</summary>
    public static async Task<bool> SetPlanAsync(this FineTuneDbContext db, JobLease lease, int totalSteps,
        string? datasetSha256, int? trainingExamples, CancellationToken ct) =>
        await db.Jobs.Where(j => j.Id == lease.JobId && j.LeaseGeneration == lease.Generation && j.Status == JobStatus.Running)
            .ExecuteUpdateAsync(s => s
                .SetProperty(j => j.TotalSteps, totalSteps)
                .SetProperty(j => j.DatasetSha256, datasetSha256)
                .SetProperty(j => j.TrainingExamples, trainingExamples)
                .SetProperty(j => j.UpdatedAt, Clock.Now()), ct) == 1;

    /// <summary>Records one step's metrics and the job's progress (step, last loss, heartbeat) in one statement.
    /// A metric for a step already recorded (a resumed run repeating it) replaces the old one.</summary>
    public static async Task<bool> RecordMetricAsync(this FineTuneDbContext db, JobLease lease, JobMetric m, CancellationToken ct)
    {
        var now = Clock.Now();
        return await db.Database.ExecuteSqlAsync($"""
            WITH held AS (
                UPDATE fine_tune_jobs SET step = {m.Step}, last_loss = {m.Loss}, heartbeat_at = {now}, updated_at = {now}
                WHERE id = {lease.JobId} AND lease_generation = {lease.Generation} AND status = 'running'
                RETURNING id)
            INSERT INTO job_metrics (job_id, step, loss, learning_rate, tokens_per_second, elapsed_seconds, validation_loss, at)
            SELECT id, {m.Step}, {m.Loss}, {m.LearningRate}, {m.TokensPerSecond}, {m.ElapsedSeconds}, {m.ValidationLoss}, {m.At} FROM held
            ON CONFLICT (job_id, step) DO UPDATE SET loss = excluded.loss, learning_rate = excluded.learning_rate,
                tokens_per_second = excluded.tokens_per_second, elapsed_seconds = excluded.elapsed_seconds,
                validation_loss = excluded.validation_loss, at = excluded.at
            """, ct) == 1;
    }

    /// <summary>Records a checkpoint (already written and renamed into place) and points the job at it.</summary>
    public static async Task<bool> RecordCheckpointAsync(this FineTuneDbContext db, JobLease lease, JobCheckpoint c, CancellationToken ct)
    {
        var now = Clock.Now();
        return await db.Database.ExecuteSqlAsync($"""
            WITH held AS (
                UPDATE fine_tune_jobs SET checkpoint_path = {c.Path}, heartbeat_at = {now}, updated_at = {now}
                WHERE id = {lease.JobId} AND lease_generation = {lease.Generation} AND status = 'running'
                RETURNING id)
            INSERT INTO job_checkpoints (job_id, step, path, sha256, size_bytes, at)
            SELECT id, {c.Step}, {c.Path}, {c.Sha256}, {c.SizeBytes}, {c.At} FROM held
            ON CONFLICT (job_id, step) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,
                size_bytes = excluded.size_bytes, at = excluded.at
            """, ct) == 1;
    }

    /// <summary>Appends an event (retry, warning, checkpoint…) while the lease holds.</summary>
    public static async Task<bool> AppendEventAsync(this FineTuneDbContext db, JobLease lease, string type, string message,
        object? data, CancellationToken ct)
    {
        var json = data is null ? null : JsonSerializer.Serialize(data, DomainJson.Options);
        return await db.Database.ExecuteSqlAsync($"""
            INSERT INTO job_events (job_id, at, type, message, data)
            SELECT id, {Clock.Now()}, {type}, {message}, CAST({json} AS jsonb) FROM fine_tune_jobs
            WHERE id = {lease.JobId} AND lease_generation = {lease.Generation} AND status = 'running'
            """, ct) == 1;
    }

    /// <summary>
    /// Applies a transition (<c>j =&gt; j.Succeed(adapterId)</c>, <c>j =&gt; j.Fail(code, msg)</c>,
    /// <c>j =&gt; j.Cancel("…")</c>, <c>j =&gt; j.Requeue("…")</c>) if the lease still holds, retrying when a
    /// heartbeat or the API's cancel changed the row meanwhile. Null when the lease was lost.
    /// </summary>
    public static async Task<FineTuneJob?> UpdateFencedAsync(this FineTuneDbContext db, JobLease lease,
        Action<FineTuneJob> change, CancellationToken ct)
    {
        for (var attempt = 0; ; attempt++)
        {
            db.ChangeTracker.Clear();
            var job = await db.Jobs.FirstOrDefaultAsync(j => j.Id == lease.JobId, ct);
            if (job is null || job.LeaseGeneration != lease.Generation || job.Status != JobStatus.Running) return null;
            change(job);
            try
            {
                await db.SaveChangesAsync(ct);
                return job;
            }
            catch (DbUpdateConcurrencyException) when (attempt < 10)
            {
            }
        }
    }
}
