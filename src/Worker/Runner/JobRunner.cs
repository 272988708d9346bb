using System.Diagnostics;
using System.Text.Json;
using FineTune.Domain.Datasets;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Data;
using FineTune.Domain.Tokenizers;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using Npgsql;

namespace FineTune.Worker.Runner;

/// <summary>
/// Runs one fine-tune job on this node: takes the job's lease, trains (resuming from the newest checkpoint), publishes
/// the adapter and records the end state. Quartz only decides where and when this runs; every state change goes
/// through <see cref="JobLease"/>, whose generation number fences a duplicate run (Quartz can start a job twice
/// after a database stall) out of every write.
/// </summary>
public sealed class JobRunner(
    NpgsqlDataSource db,
    ArtifactStore store,
    DeviceSlots devices,
    JobInputs inputs,
    IOptions<WorkerOptions> options,
    ILogger<JobRunner> log) : IJobRunner
{
    // jsonb reorders keys, so the method's discriminator may not come first: DomainJson allows that.
    private static readonly JsonSerializerOptions Json = FineTune.Domain.DomainJson.Options;
    private readonly WorkerOptions _options = options.Value;
    private readonly string _node = options.Value.NodeName ?? $"{Environment.MachineName}:{Environment.ProcessId}";

    /// <summary>
    /// Runs the firing keyed <paramref name="dispatchKey"/>: claims the best job of the pool (see
    /// <see cref="JobLease.TryClaimAsync"/>), runs it, and claims again until the pool has nothing this slot may start,
    /// so a slot that frees starts the next job (a tenant's job waiting on its running quota included) without waiting
    /// for a Quartz trigger.
    /// </summary>
    public async Task RunAsync(Guid dispatchKey, bool recovering, CancellationToken ct)
    {
        for (var first = true; !ct.IsCancellationRequested; first = false)
        {
            var lease = await JobLease.TryClaimAsync(db, dispatchKey, _node, recovering && first, _options.LeaseTimeout, ct);
            if (lease is null)
            {
                if (first) log.LogInformation("Firing {DispatchKey}: no job of its pool is runnable now", dispatchKey);
                return;
            }
            await RunLeasedAsync(lease, ct);
        }
    }

    private async Task RunLeasedAsync(JobLease lease, CancellationToken ct)
    {
        var jobId = lease.Job.Id;
        using var scope = log.BeginScope(new Dictionary<string, object> { ["JobId"] = jobId });
        log.LogInformation("Job {JobId} leased by {Node} (generation {Generation}, attempt {Attempt})",
            jobId, _node, lease.Generation, lease.Job.Attempt);

        using var device = await devices.AcquireAsync(ct);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var heartbeat = lease.KeepAliveAsync(_options.HeartbeatInterval, stop, log);
        string? staging = null;
        try
        {
            staging = store.StagingDir(jobId, lease.Generation);
            var result = await TrainAsync(lease, device.Device, staging, stop.Token);
            await PublishAsync(lease, staging, result, stop.Token);
            staging = null;
        }
        catch (OperationCanceledException)
        {
            if (lease.Lost)
                log.LogWarning("Job {JobId}: lease lost to another node; this run stops without writing", jobId);
            else if (lease.CancelRequested || await lease.IsCancelRequestedAsync())
            {
                await lease.FinishAsync(JobStatus.Cancelled, null, null, "cancelled", "Cancelled on request; no adapter was saved.");
                log.LogInformation("Job {JobId} cancelled", jobId);
            }
            else
            {
                // The node is shutting down: hand the job back; Quartz fires its recovery trigger on a live node,
                // which resumes from the last checkpoint.
                await lease.ReleaseAsync("The node shut down; the job goes back to the queue and resumes from its last checkpoint.");
                throw;
            }
        }
        catch (JobFailure failure)
        {
            await lease.FinishAsync(JobStatus.Failed, failure.Code, failure.Message, "failed", failure.Message);
            log.LogWarning("Job {JobId} failed: {Code}: {Message}", jobId, failure.Code, failure.Message);
        }
        catch (Exception e) when (e is TorchException or InvalidDataException or SafetensorsException or IOException)
        {
            await lease.FinishAsync(JobStatus.Failed, "training_error", e.Message, "failed", e.Message);
            log.LogError(e, "Job {JobId} failed while training", jobId);
        }
        catch (Exception e) when (e is DatasetEncodingException or ArgumentException or JsonException)
        {
            // Input the submit-time checks could not see (a line that does not encode, a shape that does not fit).
            await lease.FinishAsync(JobStatus.Failed, "invalid_input", e.Message, "failed", e.Message);
            log.LogWarning(e, "Job {JobId} failed on its input", jobId);
        }
        catch (Exception e)
        {
            // A bug of ours: fail the job with a clear record instead of letting Quartz fire it again and again.
            await lease.FinishAsync(JobStatus.Failed, "internal_error",
                $"The worker failed unexpectedly ({e.GetType().Name}: {e.Message}).", "failed", e.Message);
            log.LogError(e, "Job {JobId} failed unexpectedly", jobId);
        }
        finally
        {
            await stop.CancelAsync();
            await heartbeat;
            if (staging is not null && Directory.Exists(staging)) Directory.Delete(staging, recursive: true);
        }
    }

    private async Task<TrainingResult> TrainAsync(JobLease lease, Device device, string staging, CancellationToken ct)
    {
        var job = lease.Job;
        var method = JsonSerializer.Deserialize<MethodSpec>(job.MethodJson, Json)
            ?? throw new JobFailure("invalid_job", "The job's method is empty.");
        var hyper = JsonSerializer.Deserialize<Hyperparameters>(job.HyperparametersJson, Json) ?? new Hyperparameters();

        var train = await inputs.ReadDatasetAsync(job.TrainingData, "trainingData", job.DatasetSha256, ct);
        var validation = job.ValidationData is null ? null
            : await inputs.ReadDatasetAsync(job.ValidationData, "validationData", job.ValidationSha256, ct);
        var (modelDir, weightsSha256) = await inputs.ModelFolderAsync(job, ct);
        ITokenizer tokenizer;
        try { tokenizer = TokenizerLoader.Load(modelDir, _options.DefaultChatTemplate); }
        catch (TokenizerException e) { throw new JobFailure("tokenizer_error", e.Message); }

        var resumeFrom = await lease.LatestCheckpointAsync(ct);
        if (resumeFrom is not null) await lease.EventAsync("resumed", $"Resuming from the checkpoint of step {resumeFrom.Value.Step}.", ct);

        var spec = new TrainingSpec(modelDir, tokenizer, train.Examples, validation?.Examples, method, hyper,
            device, _options.ParseComputeDType(), store.CheckpointDir(job.Id), resumeFrom?.Path, staging,
            LogEvery: _options.LogEvery, CheckpointEvery: _options.CheckpointEvery, BaseModelName: job.Model)
        {
            DatasetSha256 = train.Sha256, ValidationSha256 = validation?.Sha256,
            BaseModelUri = job.ModelUri, BaseModelSha256 = weightsSha256,
            Merge = job.Merge,
        };
        var reporter = new Reporter(lease, store, _options);
        var stopwatch = Stopwatch.StartNew();
        var result = await new Trainer().RunAsync(spec, reporter, ct);
        log.LogInformation("Job {JobId} trained {Steps} steps in {Seconds:F1}s, final loss {Loss:F4}",
            job.Id, result.Steps, stopwatch.Elapsed.TotalSeconds, result.FinalLoss);
        return result;
    }

    private async Task PublishAsync(JobLease lease, string staging, TrainingResult result, CancellationToken ct)
    {
        var files = ArtifactStore.Describe(staging);
        var metadataPath = Path.Combine(staging, "metadata.json");
        var metadata = File.Exists(metadataPath) ? await File.ReadAllTextAsync(metadataPath, ct) : "{}";
        await lease.PublishAdapterAsync(store, staging, files, metadata, result, ct);
    }

    /// <summary>The trainer's callbacks: each write is fenced by the lease generation.</summary>
    private sealed class Reporter(JobLease lease, ArtifactStore store, WorkerOptions options) : ITrainingReporter
    {
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) =>
            new(lease.StartedAsync(totalSteps, resumedFromStep, ct));

        public ValueTask OnMetricsAsync(TrainingMetrics m, CancellationToken ct) => new(lease.MetricsAsync(m, ct));

        public async ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => await lease.EnsureHeldAsync(ct);

        public async ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct)
        {
            await lease.CheckpointAsync(step, path, sha256, sizeBytes, ct);
            store.PruneCheckpoints(lease.Job.Id, options.KeepCheckpoints);
        }
    }
}

/// <summary>A job failure with a code for the API (not retried: the same input fails the same way).</summary>
public sealed class JobFailure(string code, string message) : Exception(message)
{
    public string Code { get; } = code;
}
