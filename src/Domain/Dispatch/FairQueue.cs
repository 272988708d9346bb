using Npgsql;

namespace FineTune.Domain.Dispatch;

/// <summary>A queued job's place in its pool: where it stands, when it may start, and what it waits for.</summary>
/// <param name="Position">1 = the next job the pool starts (assuming no new submissions and quotas allowing).</param>
/// <param name="EstimatedStartAt">From the pool's running jobs and the mean duration of its recent jobs; null
/// until the pool has finished a job to measure.</param>
/// <param name="WaitingFor"><c>slot</c> (a free worker slot), or <c>maxRunningJobs</c> (the tenant's running-jobs quota
/// is full: the job starts once one of the tenant's jobs ends).</param>
public sealed record QueueInfo(int Position, DateTimeOffset? EstimatedStartAt, string WaitingFor);

/// <summary>
/// The order in which a pool starts its queued jobs, in one SQL query shared by the worker's claim (which takes the
/// first admissible row) and the API's queue positions (which number the rows).
/// <para>Order: priority (high, normal, low), then fair share, then age. A tenant's k-th queued job (in its own
/// priority-then-age order) has share = the tenant's running jobs in the pool + k, so tenants take turns: with A's ten
/// jobs and B's one queued, B's job is at most second. Equal shares go to the tenant whose last start in the pool is
/// oldest (round robin; one-slot pools have no running jobs to compare at claim time), then to the older job.</para>
/// <para>Admission: a tenant whose running jobs (all pools) reached its <c>max_running_jobs</c> is skipped by the
/// claim; its jobs stay queued and are claimed once one of its jobs ends (the runner that finishes claims again).</para>
/// </summary>
public static class FairQueue
{
    public const string WaitingForSlot = "slot", WaitingForRunningQuota = "maxRunningJobs";

    /// <summary>Cluster-wide lock taken by every claim: admission reads running counts, so claims are serialised
    /// (one short transaction per job start).</summary>
    public const long ClaimLockKey = 0x46_54_44_49_53_50; // "FTDISP"

    /// <summary>The ordered queued jobs of pool <c>@pool</c>, with <paramref name="filter"/> (a condition on the
    /// output columns) and <paramref name="limit"/> applied.</summary>
    public static string OrderedSql(string filter = "TRUE", string limit = "ALL") => $"""
        WITH queued AS (
            SELECT id, tenant_id, priority, created_at FROM fine_tune_jobs
             WHERE pool = @pool AND status = 'queued' AND NOT cancel_requested),
        here AS (SELECT DISTINCT tenant_id FROM queued),
        running AS (
            SELECT tenant_id, count(*) FILTER (WHERE pool = @pool) AS in_pool, count(*) AS total FROM fine_tune_jobs
             WHERE status = 'running' AND tenant_id IN (SELECT tenant_id FROM here) GROUP BY tenant_id),
        last_start AS (
            SELECT tenant_id, max(started_at) AS at FROM fine_tune_jobs
             WHERE pool = @pool AND started_at > now() - interval '1 day' AND tenant_id IN (SELECT tenant_id FROM here)
             GROUP BY tenant_id),
        ordered AS (
            SELECT q.id, q.tenant_id, q.priority, q.created_at,
                   coalesce(r.in_pool, 0) + row_number() OVER (PARTITION BY q.tenant_id ORDER BY q.priority DESC, q.created_at, q.id) - 1 AS share,
                   l.at AS last_started,
                   (t.max_running_jobs IS NULL OR coalesce(r.total, 0) < t.max_running_jobs) AS admissible
              FROM queued q
              JOIN tenants t ON t.id = q.tenant_id
              LEFT JOIN running r ON r.tenant_id = q.tenant_id
              LEFT JOIN last_start l ON l.tenant_id = q.tenant_id)
        SELECT id, tenant_id, admissible FROM ordered
         WHERE {filter}
         ORDER BY priority DESC, share, last_started NULLS FIRST, created_at, id
         LIMIT {limit}
        """;

    /// <summary>Positions and estimated start times of every queued job of <paramref name="pools"/> (at most 10 000
    /// per pool are ranked).</summary>
    public static async Task<Dictionary<Guid, QueueInfo>> EstimateAsync(NpgsqlDataSource db, IEnumerable<string> pools, CancellationToken ct)
    {
        var result = new Dictionary<Guid, QueueInfo>();
        await using var conn = await db.OpenConnectionAsync(ct);
        foreach (var pool in pools.Distinct())
        {
            var order = new List<(Guid Id, bool Admissible)>();
            await using (var cmd = new NpgsqlCommand(OrderedSql(limit: "10000"), conn))
            {
                cmd.Parameters.AddWithValue("pool", pool);
                await using var r = await cmd.ExecuteReaderAsync(ct);
                while (await r.ReadAsync(ct)) order.Add((r.GetGuid(0), r.GetBoolean(2)));
            }
            if (order.Count == 0) continue;
            var (mean, running) = await PoolHistoryAsync(conn, pool, ct);
            var starts = EstimateStarts(DateTimeOffset.UtcNow, mean, running, order.Count);
            for (var i = 0; i < order.Count; i++)
                result[order[i].Id] = new QueueInfo(i + 1, starts[i], order[i].Admissible ? WaitingForSlot : WaitingForRunningQuota);
        }
        return result;
    }

    /// <summary>Mean run time of the pool's last 20 succeeded jobs, and (elapsed, step, total) of its running ones.</summary>
    private static async Task<(TimeSpan? Mean, List<(TimeSpan Elapsed, int Step, int Total)> Running)> PoolHistoryAsync(
        NpgsqlConnection conn, string pool, CancellationToken ct)
    {
        TimeSpan? mean = null;
        await using (var cmd = new NpgsqlCommand("""
            SELECT avg(extract(epoch FROM finished_at - started_at))::float8 FROM (
                SELECT started_at, finished_at FROM fine_tune_jobs
                 WHERE pool = @pool AND status = 'succeeded' AND started_at IS NOT NULL AND finished_at IS NOT NULL
                 ORDER BY finished_at DESC LIMIT 20) recent
            """, conn))
        {
            cmd.Parameters.AddWithValue("pool", pool);
            if (await cmd.ExecuteScalarAsync(ct) is double seconds) mean = TimeSpan.FromSeconds(seconds);
        }
        var running = new List<(TimeSpan, int, int)>();
        await using (var cmd = new NpgsqlCommand("""
            SELECT extract(epoch FROM now() - started_at)::float8, step, total_steps
              FROM fine_tune_jobs WHERE pool = @pool AND status = 'running' AND started_at IS NOT NULL
            """, conn))
        {
            cmd.Parameters.AddWithValue("pool", pool);
            await using var r = await cmd.ExecuteReaderAsync(ct);
            while (await r.ReadAsync(ct)) running.Add((TimeSpan.FromSeconds(Math.Max(0, r.GetDouble(0))), r.GetInt32(1), r.GetInt32(2)));
        }
        return (mean, running);
    }

    /// <summary>
    /// Start times of <paramref name="queued"/> jobs taken in order by the earliest free slot. The pool has as many
    /// slots as it runs jobs now (at least one): with a queue, a pool that could run more would be running them. A
    /// running job ends after its progress rate predicts (or the mean run time); a queued one takes the mean. Null
    /// everywhere when there is no mean to go by.
    /// </summary>
    public static DateTimeOffset?[] EstimateStarts(DateTimeOffset now, TimeSpan? mean,
        IReadOnlyList<(TimeSpan Elapsed, int Step, int Total)> running, int queued)
    {
        var starts = new DateTimeOffset?[queued];
        if (mean is not { } d) return starts;
        var free = new PriorityQueue<DateTimeOffset, DateTimeOffset>();
        foreach (var (elapsed, step, total) in running)
        {
            var remaining = step > 0 && total > step
                ? TimeSpan.FromTicks((long)(elapsed.Ticks * (double)(total - step) / step))
                : d > elapsed ? d - elapsed : TimeSpan.Zero;
            var at = now + remaining;
            free.Enqueue(at, at);
        }
        if (free.Count == 0) free.Enqueue(now, now);
        for (var i = 0; i < queued; i++)
        {
            var at = free.Dequeue();
            starts[i] = at;
            free.Enqueue(at + d, at + d);
        }
        return starts;
    }
}
