using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Adapters;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Jobs;
using FineTune.Worker.Training;
using Microsoft.Extensions.Logging;
using Npgsql;
using NpgsqlTypes;

namespace FineTune.Worker.Runner;

/// <summary>The job row as the runner needs it.</summary>
public sealed record JobRow(Guid Id, Guid TenantId, string Model, string ModelPath, string TrainingData,
    string? ValidationData, string MethodJson, string HyperparametersJson, string AdapterName, int Attempt, bool Merge = false)
{
    /// <summary>The model's source (file:// or https:// folder) and registered weights checksum, recorded at submit.</summary>
    public string? ModelUri { get; init; }
    public string? ModelSha256 { get; init; }
    /// <summary>The datasets' sha256 at submit: the worker refuses content that changed since.</summary>
    public string? DatasetSha256 { get; init; }
    public string? ValidationSha256 { get; init; }
}

/// <summary>
/// This node's claim on a job: taken by a conditional update that bumps <c>lease_generation</c>, renewed by a
/// heartbeat, and checked by every write (status, metrics, checkpoints, the adapter) with
/// <c>WHERE lease_generation = @gen</c>. A second runner of the same job (Quartz recovery after a database stall)
/// takes a newer generation; the older one's next write or heartbeat finds it gone and stops.
/// </summary>
public sealed class JobLease
{
    private readonly NpgsqlDataSource _db;

    private JobLease(NpgsqlDataSource db, JobRow job, long generation)
    {
        _db = db; Job = job; Generation = generation;
    }

    public JobRow Job { get; }
    public long Generation { get; }
    /// <summary>Another runner holds the job now; nothing more may be written.</summary>
    public bool Lost { get; private set; }
    /// <summary>The API asked for cancellation (seen by the heartbeat).</summary>
    public bool CancelRequested { get; private set; }

    /// <summary>
    /// Claims a job for the Quartz firing keyed <paramref name="dispatchKey"/> (a job id of the pool). Quartz is the
    /// wake-up and the failover; which job runs is decided here, from our table, in one transaction under a
    /// cluster-wide lock: (1) when Quartz recovers a dead node's firing, the job that firing was running is taken over;
    /// (2) else a running job of the pool whose lease expired; (3) else the first admissible queued job in
    /// <see cref="FairQueue"/> order (priority, fair share, age; tenants at their running-jobs quota skipped). The
    /// claim is the same conditional update as ever, bumping <c>lease_generation</c>, so fencing is unchanged.
    /// </summary>
    public static async Task<JobLease?> TryClaimAsync(NpgsqlDataSource db, Guid dispatchKey, string node, bool recovering,
        TimeSpan leaseTimeout, CancellationToken ct)
    {
        await using var conn = await db.OpenConnectionAsync(ct);
        await using var tx = await conn.BeginTransactionAsync(ct);
        string? pool;
        await using (var poolCmd = new NpgsqlCommand("SELECT pool FROM fine_tune_jobs WHERE id = @key", conn, tx))
        {
            poolCmd.Parameters.AddWithValue("key", dispatchKey);
            pool = await poolCmd.ExecuteScalarAsync(ct) as string;
        }
        if (pool is null) return null;
        await using (var lockCmd = new NpgsqlCommand($"SELECT pg_advisory_xact_lock({FairQueue.ClaimLockKey})", conn, tx))
            await lockCmd.ExecuteNonQueryAsync(ct);

        async Task<Guid?> Pick(string sql)
        {
            await using var cmd = new NpgsqlCommand(sql, conn, tx);
            cmd.Parameters.AddWithValue("key", dispatchKey);
            cmd.Parameters.AddWithValue("pool", pool);
            cmd.Parameters.AddWithValue("timeout", leaseTimeout);
            return await cmd.ExecuteScalarAsync(ct) is Guid id ? id : null;
        }
        Guid? target = null;
        var takeover = false;
        if (recovering)
        {
            // Jobs claimed before dispatch keys existed ran under their own key.
            target = await Pick("""
                SELECT id FROM fine_tune_jobs WHERE status = 'running' AND NOT cancel_requested
                   AND (dispatch_key = @key OR (dispatch_key IS NULL AND id = @key)) LIMIT 1
                """);
            takeover = target is not null;
        }
        target ??= await Pick("""
            SELECT id FROM fine_tune_jobs
             WHERE pool = @pool AND status = 'running' AND NOT cancel_requested
               AND (heartbeat_at IS NULL OR heartbeat_at < now() - @timeout)
             ORDER BY priority DESC, created_at LIMIT 1
            """);
        var fromRunning = target is not null;
        target ??= await Pick(FairQueue.OrderedSql(filter: "admissible", limit: "1"));
        if (target is null)
        {
            await tx.CommitAsync(ct);
            return null;
        }

        // A queued job is free. A running one is taken over when Quartz says it is recovering a dead node's firing,
        // or when its lease has expired; a running job with a live lease is left alone.
        const string sql = """
            UPDATE fine_tune_jobs SET status = 'running', lease_owner = @node, lease_generation = lease_generation + 1,
                   heartbeat_at = now(), started_at = coalesce(started_at, now()), attempt = attempt + 1, updated_at = now(),
                   dispatch_key = @key
             WHERE id = @id AND NOT cancel_requested
               AND (status = 'queued'
                    OR (status = 'running' AND (@takeover OR heartbeat_at IS NULL OR heartbeat_at < now() - @timeout)))
            RETURNING tenant_id, model, model_path, training_data, validation_data, method::text, hyperparameters::text,
                      adapter_name, attempt, lease_generation, model_uri, model_sha256, dataset_sha256, validation_sha256, merge
            """;
        await using var cmd = new NpgsqlCommand(sql, conn, tx);
        cmd.Parameters.AddWithValue("id", target.Value);
        cmd.Parameters.AddWithValue("key", dispatchKey);
        cmd.Parameters.AddWithValue("node", node);
        cmd.Parameters.AddWithValue("takeover", takeover);
        cmd.Parameters.AddWithValue("timeout", leaseTimeout);
        JobRow job;
        long generation;
        await using (var r = await cmd.ExecuteReaderAsync(ct))
        {
            if (!await r.ReadAsync(ct)) return null;
            string? Text(int i) => r.IsDBNull(i) ? null : r.GetString(i);
            job = new JobRow(target.Value, r.GetGuid(0), r.GetString(1), r.GetString(2), r.GetString(3),
                Text(4), r.GetString(5), r.GetString(6), r.GetString(7), r.GetInt32(8), r.GetBoolean(14))
            {
                ModelUri = Text(10), ModelSha256 = Text(11), DatasetSha256 = Text(12), ValidationSha256 = Text(13),
            };
            generation = r.GetInt64(9);
        }
        await tx.CommitAsync(ct);
        var lease = new JobLease(db, job, generation);
        var recovered = fromRunning;
        await lease.EventAsync(recovered ? "recovered" : "running",
            $"Running on {node} (attempt {job.Attempt}{(recovered ? ", recovered after a node failure" : "")}).", ct);
        return lease;
    }

    /// <summary>Renews the lease until <paramref name="stop"/> is cancelled; cancels it itself when the lease is lost
    /// or the API asks for cancellation (a second path beside Quartz's interrupt, which needs the node's check-in).</summary>
    public async Task KeepAliveAsync(TimeSpan interval, CancellationTokenSource stop, ILogger log)
    {
        while (!stop.IsCancellationRequested)
        {
            try { await Task.Delay(interval, stop.Token); }
            catch (OperationCanceledException) { return; }
            try
            {
                await using var cmd = _db.CreateCommand(
                    "UPDATE fine_tune_jobs SET heartbeat_at = now() WHERE id = @id AND lease_generation = @gen RETURNING cancel_requested");
                cmd.Parameters.AddWithValue("id", Job.Id);
                cmd.Parameters.AddWithValue("gen", Generation);
                var result = await cmd.ExecuteScalarAsync(stop.Token);
                if (result is null) Lost = true;
                else if (result is true) CancelRequested = true;
                if (Lost || CancelRequested) { await stop.CancelAsync(); return; }
            }
            catch (OperationCanceledException) { return; }
            catch (NpgsqlException e)
            {
                // A database blip: keep training; the lease stays ours unless the outage outlasts LeaseTimeout,
                // and every fenced write below would notice a takeover.
                log.LogWarning(e, "Heartbeat of job {JobId} failed; retrying", Job.Id);
            }
        }
    }

    public async Task<bool> IsCancelRequestedAsync()
    {
        await using var cmd = _db.CreateCommand("SELECT cancel_requested FROM fine_tune_jobs WHERE id = @id");
        cmd.Parameters.AddWithValue("id", Job.Id);
        return await cmd.ExecuteScalarAsync() is true;
    }

    /// <summary>Throws (as a cancellation) when another runner has taken the job.</summary>
    public async Task EnsureHeldAsync(CancellationToken ct)
    {
        await using var cmd = _db.CreateCommand("SELECT 1 FROM fine_tune_jobs WHERE id = @id AND lease_generation = @gen");
        cmd.Parameters.AddWithValue("id", Job.Id);
        cmd.Parameters.AddWithValue("gen", Generation);
        if (await cmd.ExecuteScalarAsync(ct) is null) LoseLease();
    }

    public Task EventAsync(string type, string message, CancellationToken ct, string? dataJson = null) =>
        ExecuteFencedAsync("""
            INSERT INTO job_events (job_id, at, type, message, data)
            SELECT @id, now(), @type, @message, @data::jsonb
             WHERE EXISTS (SELECT 1 FROM fine_tune_jobs WHERE id = @id AND lease_generation = @gen)
            """, ct, ("type", type), ("message", message), ("data", (object?)dataJson ?? DBNull.Value));

    public async Task StartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct)
    {
        await ExecuteFencedAsync("""
            UPDATE fine_tune_jobs SET total_steps = @total, step = @step, updated_at = now()
             WHERE id = @id AND lease_generation = @gen
            """, ct, ("total", (int)totalSteps), ("step", (int)resumedFromStep));
        await EventAsync("training", resumedFromStep > 0
            ? $"Training resumed at step {resumedFromStep} of {totalSteps}."
            : $"Training started: {totalSteps} optimizer steps.", ct);
    }

    public Task MetricsAsync(TrainingMetrics m, CancellationToken ct) =>
        // Steps after a resume may be logged a second time: the later run's values win.
        ExecuteFencedAsync("""
            WITH held AS (
                UPDATE fine_tune_jobs SET step = @step, last_loss = @loss, updated_at = now()
                 WHERE id = @id AND lease_generation = @gen RETURNING id)
            INSERT INTO job_metrics (job_id, step, loss, learning_rate, tokens_per_second, elapsed_seconds, validation_loss, at)
            SELECT id, @step, @loss, @lr, @tps, @elapsed, @vloss, now() FROM held
            ON CONFLICT (job_id, step) DO UPDATE SET loss = excluded.loss, learning_rate = excluded.learning_rate,
                tokens_per_second = excluded.tokens_per_second, elapsed_seconds = excluded.elapsed_seconds,
                validation_loss = excluded.validation_loss, at = excluded.at
            """, ct, ("step", (int)m.Step), ("loss", m.Loss), ("lr", m.LearningRate), ("tps", m.TokensPerSecond),
            ("elapsed", m.ElapsedSeconds), ("vloss", (object?)m.ValidationLoss ?? DBNull.Value));

    public Task CheckpointAsync(long step, string path, string sha256, long size, CancellationToken ct) =>
        ExecuteFencedAsync("""
            WITH held AS (
                UPDATE fine_tune_jobs SET checkpoint_path = @path, updated_at = now()
                 WHERE id = @id AND lease_generation = @gen RETURNING id)
            INSERT INTO job_checkpoints (job_id, step, path, sha256, size_bytes, at)
            SELECT id, @step, @path, @sha, @size, now() FROM held
            ON CONFLICT (job_id, step) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,
                size_bytes = excluded.size_bytes, at = excluded.at
            """, ct, ("step", (int)step), ("path", path), ("sha", sha256), ("size", size));

    /// <summary>The newest recorded checkpoint whose file is present and intact, or null.</summary>
    public async Task<(long Step, string Path)?> LatestCheckpointAsync(CancellationToken ct)
    {
        var rows = new List<(long Step, string Path, string Sha)>();
        await using (var cmd = _db.CreateCommand("SELECT step, path, sha256 FROM job_checkpoints WHERE job_id = @id ORDER BY step DESC"))
        {
            cmd.Parameters.AddWithValue("id", Job.Id);
            await using var r = await cmd.ExecuteReaderAsync(ct);
            while (await r.ReadAsync(ct)) rows.Add((r.GetInt32(0), r.GetString(1), r.GetString(2)));
        }
        foreach (var (step, path, sha) in rows)
            if (File.Exists(path) && ArtifactStore.Sha256Of(path) == sha) return (step, path);
        return null;
    }

    /// <summary>Registers the adapter as the next version of its task and marks the job succeeded, atomically.</summary>
    public async Task PublishAdapterAsync(ArtifactStore store, string staging, List<ArtifactFile> files, string metadataJson,
        TrainingResult result, CancellationToken ct)
    {
        await using var conn = await _db.OpenConnectionAsync(ct);
        await using var tx = await conn.BeginTransactionAsync(ct);
        await using (var held = new NpgsqlCommand(
            "SELECT 1 FROM fine_tune_jobs WHERE id = @id AND lease_generation = @gen FOR UPDATE", conn, tx))
        {
            held.Parameters.AddWithValue("id", Job.Id);
            held.Parameters.AddWithValue("gen", Generation);
            if (await held.ExecuteScalarAsync(ct) is null) LoseLease();
        }
        // Versions of one task are numbered in completion order; the advisory lock serialises concurrent finishers.
        await using (var lockCmd = new NpgsqlCommand("SELECT pg_advisory_xact_lock(hashtextextended(@key, 0))", conn, tx))
        {
            lockCmd.Parameters.AddWithValue("key", $"adapter:{Job.TenantId}:{Job.AdapterName}");
            await lockCmd.ExecuteNonQueryAsync(ct);
        }
        int version;
        await using (var next = new NpgsqlCommand(
            "SELECT coalesce(max(version), 0) + 1 FROM adapters WHERE tenant_id = @tenant AND name = @name", conn, tx))
        {
            next.Parameters.AddWithValue("tenant", Job.TenantId);
            next.Parameters.AddWithValue("name", Job.AdapterName);
            version = (int)(await next.ExecuteScalarAsync(ct))!;
        }
        var path = store.Publish(staging, Job.TenantId, Job.AdapterName, version);
        var adapterId = Guid.CreateVersion7();
        var methodType = JsonDocument.Parse(Job.MethodJson).RootElement.GetProperty("type").GetString() ?? "unknown";
        await using (var insert = new NpgsqlCommand("""
            INSERT INTO adapters (id, tenant_id, name, version, job_id, method_type, base_model, path, files, metadata, created_at,
                                  method, hyperparameters, base_model_sha256, dataset_uri, dataset_sha256, validation_dataset_uri,
                                  final_loss, final_validation_loss, size_bytes)
            VALUES (@aid, @tenant, @name, @version, @id, @method, @base, @path, @files, @metadata, now(),
                    @methodJson, @hyperJson, @baseSha, @dataset, @datasetSha, @validation, @finalLoss, @finalValidation, @size);
            UPDATE fine_tune_jobs SET status = 'succeeded', adapter_id = @aid, finished_at = now(), updated_at = now(),
                   step = @steps, last_loss = @loss, lease_owner = NULL
             WHERE id = @id AND lease_generation = @gen;
            INSERT INTO job_events (job_id, at, type, message, data) VALUES (@id, now(), 'succeeded', @message, @data);
            """, conn, tx))
        {
            var p = insert.Parameters;
            p.AddWithValue("aid", adapterId);
            p.AddWithValue("tenant", Job.TenantId);
            p.AddWithValue("name", Job.AdapterName);
            p.AddWithValue("version", version);
            p.AddWithValue("id", Job.Id);
            p.AddWithValue("gen", Generation);
            p.AddWithValue("method", methodType);
            p.AddWithValue("base", Job.Model);
            p.AddWithValue("path", path);
            p.AddWithValue("files", NpgsqlDbType.Jsonb, JsonSerializer.Serialize(files, JsonOptions));
            p.AddWithValue("metadata", NpgsqlDbType.Jsonb, metadataJson);
            // Lineage columns: what the registry searches by (metadata.json keeps the full record).
            var meta = JsonNode.Parse(metadataJson);
            p.AddWithValue("methodJson", NpgsqlDbType.Jsonb, Job.MethodJson);
            p.AddWithValue("hyperJson", NpgsqlDbType.Jsonb, Job.HyperparametersJson);
            p.AddWithValue("baseSha", NpgsqlDbType.Text, (object?)Lineage.BaseModelChecksum(meta) ?? DBNull.Value);
            p.AddWithValue("dataset", Job.TrainingData);
            p.AddWithValue("datasetSha", NpgsqlDbType.Text, (object?)meta?["dataset_sha256"]?.GetValue<string>() ?? DBNull.Value);
            p.AddWithValue("validation", NpgsqlDbType.Text, (object?)Job.ValidationData ?? DBNull.Value);
            p.AddWithValue("finalLoss", NpgsqlDbType.Double, (object?)Lineage.Number(meta, "final_loss") ?? DBNull.Value);
            p.AddWithValue("finalValidation", NpgsqlDbType.Double, (object?)Lineage.Number(meta, "final_validation_loss") ?? DBNull.Value);
            p.AddWithValue("size", files.Sum(f => f.Size));
            p.AddWithValue("steps", (int)result.Steps);
            p.AddWithValue("loss", result.FinalLoss);
            p.AddWithValue("message", $"Adapter {Job.AdapterName} v{version} published ({files.Count} files); final loss {result.FinalLoss:F4}.");
            p.AddWithValue("data", NpgsqlDbType.Jsonb, JsonSerializer.Serialize(new { adapterId, version, path }, JsonOptions));
            await insert.ExecuteNonQueryAsync(ct);
        }
        await tx.CommitAsync(ct);
    }

    /// <summary>Ends the job (failed or cancelled) if this lease still holds it.</summary>
    public async Task FinishAsync(JobStatus status, string? errorCode, string? errorMessage, string eventType, string eventMessage)
    {
        var statusText = status.ToString().ToLowerInvariant();
        await ExecuteFencedAsync("""
            WITH held AS (
                UPDATE fine_tune_jobs SET status = @status, error_code = @code, error_message = @error,
                       finished_at = now(), updated_at = now(), lease_owner = NULL
                 WHERE id = @id AND lease_generation = @gen AND status = 'running' RETURNING id)
            INSERT INTO job_events (job_id, at, type, message) SELECT id, now(), @type, @message FROM held
            """, CancellationToken.None, throwIfLost: false, ("status", statusText), ("code", (object?)errorCode ?? DBNull.Value),
            ("error", (object?)Truncate(errorMessage, 4000) ?? DBNull.Value), ("type", eventType), ("message", Truncate(eventMessage, 4000)!));
    }

    /// <summary>Gives the job back to the queue (node shutdown): another node recovers it from its checkpoint.</summary>
    public Task ReleaseAsync(string message) =>
        ExecuteFencedAsync("""
            WITH held AS (
                UPDATE fine_tune_jobs SET status = 'queued', lease_owner = NULL, heartbeat_at = NULL, updated_at = now()
                 WHERE id = @id AND lease_generation = @gen AND status = 'running' RETURNING id)
            INSERT INTO job_events (job_id, at, type, message) SELECT id, now(), 'requeued', @message FROM held
            """, CancellationToken.None, throwIfLost: false, ("message", message));

    private static readonly JsonSerializerOptions JsonOptions = new(JsonSerializerDefaults.Web);

    private static string? Truncate(string? s, int max) => s is null || s.Length <= max ? s : s[..max];

    private void LoseLease()
    {
        Lost = true;
        throw new OperationCanceledException($"The lease of job {Job.Id} (generation {Generation}) was taken by another runner.");
    }

    private Task ExecuteFencedAsync(string sql, CancellationToken ct, params (string Name, object Value)[] args) =>
        ExecuteFencedAsync(sql, ct, throwIfLost: true, args);

    private async Task ExecuteFencedAsync(string sql, CancellationToken ct, bool throwIfLost, params (string Name, object Value)[] args)
    {
        await using var cmd = _db.CreateCommand(sql);
        cmd.Parameters.AddWithValue("id", Job.Id);
        cmd.Parameters.AddWithValue("gen", Generation);
        foreach (var (name, value) in args)
            if (sql.Contains('@' + name)) cmd.Parameters.AddWithValue(name, value);
        if (await cmd.ExecuteNonQueryAsync(ct) == 0 && throwIfLost) LoseLease();
    }
}
