using FineTune.Domain.Methods;

namespace FineTune.Domain.Jobs;

/// <summary>
/// One fine-tune job: the source of truth for its status, progress, lease and result. Status only changes through
/// the transition methods below, which refuse illegal moves and append a <see cref="JobEvent"/> each; the row is
/// saved with optimistic concurrency on Postgres' xmin (<see cref="Version"/>).
/// </summary>
public sealed class FineTuneJob
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid TenantId { get; init; }
    /// <summary>The model reference as the client gave it (a registered name or a file:// folder).</summary>
    public required string Model { get; init; }
    /// <summary>The resolved absolute model folder (what the worker loads).</summary>
    public required string ModelPath { get; init; }
    public required string TrainingData { get; init; }
    public string? ValidationData { get; init; }
    public required MethodSpec Method { get; init; }
    public required Hyperparameters Hyperparameters { get; init; }
    public required string AdapterName { get; init; }
    public required string Pool { get; init; }
    public int Priority { get; init; }
    /// <summary>Also publish the merged full model (<c>merged/</c>) beside the adapter.</summary>
    public bool Merge { get; init; }

    public JobStatus Status { get; private set; } = JobStatus.Queued;
    public bool CancelRequested { get; private set; }
    public int Attempt { get; private set; }
    public int Step { get; set; }
    public int TotalSteps { get; set; }
    public double? LastLoss { get; set; }
    public string? ErrorCode { get; private set; }
    public string? ErrorMessage { get; private set; }
    public string? LeaseOwner { get; private set; }
    /// <summary>Bumped by every claim; the runner fences each write on the generation it claimed.</summary>
    public long LeaseGeneration { get; private set; }
    /// <summary>The Quartz firing (its job key) that runs the job now: a firing claims the best job of its pool, not
    /// necessarily the one its key names, so cancel interrupts this key and recovery of the firing takes over this job.</summary>
    public Guid? DispatchKey { get; private set; }
    public DateTimeOffset? HeartbeatAt { get; set; }
    public string? CheckpointPath { get; set; }
    public Guid? AdapterId { get; private set; }
    /// <summary>Where the model comes from: the file:// folder, or the https:// folder URI whose weights the worker fetches.</summary>
    public string? ModelUri { get; init; }
    /// <summary>The registered weights checksum (see WeightsDigest); the worker refuses other weights.</summary>
    public string? ModelSha256 { get; init; }
    /// <summary>sha256 of the training file at submit; the worker refuses a file that changed since.</summary>
    public string? DatasetSha256 { get; set; }
    /// <summary>Training examples, tokens (after truncation) and truncated examples counted at submit.</summary>
    public int? TrainingExamples { get; set; }
    public long? DatasetTokens { get; init; }
    public int? DatasetTruncated { get; init; }
    /// <summary>Examples left with nothing to learn once truncated (the worker leaves them out).</summary>
    public int? DatasetSkipped { get; init; }
    public string? ValidationSha256 { get; init; }
    public int? ValidationExamples { get; init; }
    public long? ValidationTokens { get; init; }
    /// <summary>Submit-time estimate: tokens to process (all epochs) and seconds at the pool's configured speed.</summary>
    public long? EstimatedTokens { get; init; }
    public double? EstimatedSeconds { get; init; }
    public string? IdempotencyKey { get; init; }
    public string? RequestHash { get; init; }
    public DateTimeOffset CreatedAt { get; init; } = Clock.Now();
    public DateTimeOffset? StartedAt { get; private set; }
    public DateTimeOffset? FinishedAt { get; private set; }
    public DateTimeOffset UpdatedAt { get; set; } = Clock.Now();
    /// <summary>Postgres xmin: the optimistic concurrency token.</summary>
    public uint Version { get; private set; }

    /// <summary>Events appended by transitions since the job was loaded (saved with it); not the full history.</summary>
    public List<JobEvent> Events { get; } = [];

    public bool IsFinished => Status is JobStatus.Succeeded or JobStatus.Failed or JobStatus.Cancelled;

    /// <summary>Records the creation event; call once when the job is added.</summary>
    public JobEvent Created() => Append(JobEventTypes.Queued, $"Job queued on pool '{Pool}'");

    /// <summary>queued → running (a first run or a recovery). Takes the lease: a new generation the runner fences on.</summary>
    public JobEvent Claim(string leaseOwner, DateTimeOffset? now = null)
    {
        var at = Move(JobStatus.Running, now);
        Attempt++;
        LeaseGeneration++;
        LeaseOwner = leaseOwner;
        HeartbeatAt = at;
        StartedAt ??= at;
        return Append(JobEventTypes.Running, $"Attempt {Attempt} started on {leaseOwner}", at,
            new { attempt = Attempt, leaseOwner, leaseGeneration = LeaseGeneration });
    }

    /// <summary>Whether a runner may claim the job now: queued, or running with a lease that stopped heart-beating.</summary>
    public bool IsClaimable(DateTimeOffset now, TimeSpan staleAfter) =>
        !CancelRequested && (Status == JobStatus.Queued
            || Status == JobStatus.Running && (HeartbeatAt is null || HeartbeatAt < now - staleAfter));

    /// <summary>Takes over a running job whose lease went stale (its node died): running → queued → running.</summary>
    public IReadOnlyList<JobEvent> Reclaim(string leaseOwner, string reason, DateTimeOffset? now = null) =>
        Status == JobStatus.Running ? [Requeue(reason, now), Claim(leaseOwner, now)] : [Claim(leaseOwner, now)];

    /// <summary>running → queued (recovery: the node went away, or a transient error to retry). Drops the lease.</summary>
    public JobEvent Requeue(string reason, DateTimeOffset? now = null)
    {
        var at = Move(JobStatus.Queued, now);
        LeaseOwner = null;
        HeartbeatAt = null;
        return Append(JobEventTypes.Queued, $"Requeued: {reason}", at);
    }

    public JobEvent Succeed(Guid adapterId, DateTimeOffset? now = null)
    {
        var at = Move(JobStatus.Succeeded, now);
        AdapterId = adapterId;
        return Finish(JobEventTypes.Succeeded, $"Succeeded at step {Step}; adapter {adapterId}", at, new { adapterId, step = Step });
    }

    public JobEvent Fail(string code, string message, DateTimeOffset? now = null)
    {
        var at = Move(JobStatus.Failed, now);
        ErrorCode = code;
        ErrorMessage = message;
        return Finish(JobEventTypes.Failed, $"{code}: {message}", at, new { code, step = Step });
    }

    /// <summary>queued|running → cancelled.</summary>
    public JobEvent Cancel(string reason, DateTimeOffset? now = null)
    {
        var at = Move(JobStatus.Cancelled, now);
        CancelRequested = true;
        return Finish(JobEventTypes.Cancelled, reason, at, new { step = Step });
    }

    /// <summary>Asks a running job to stop; the runner sees the flag (and its interrupted token) and cancels.</summary>
    /// <returns>The event, or null when a cancel was already requested.</returns>
    public JobEvent? RequestCancel(DateTimeOffset? now = null)
    {
        if (Status != JobStatus.Running) throw new InvalidJobTransitionException(Status, JobEventTypes.CancelRequested);
        if (CancelRequested) return null;
        CancelRequested = true;
        return Append(JobEventTypes.CancelRequested, "Cancel requested", Touch(now));
    }

    /// <summary>Appends a free-form event (retries, warnings, checkpoints) without a status change.</summary>
    public JobEvent Append(string type, string message, DateTimeOffset? at = null, object? data = null)
    {
        var e = JobEvent.Create(Id, type, message, at ?? Clock.Now(), data);
        Events.Add(e);
        return e;
    }

    private JobEvent Finish(string type, string message, DateTimeOffset at, object data)
    {
        FinishedAt = at;
        LeaseOwner = null;
        return Append(type, message, at, data);
    }

    private DateTimeOffset Move(JobStatus to, DateTimeOffset? now)
    {
        if (!JobTransitions.IsAllowed(Status, to)) throw new InvalidJobTransitionException(Status, to.ToWire());
        Status = to;
        return Touch(now);
    }

    private DateTimeOffset Touch(DateTimeOffset? now)
    {
        UpdatedAt = now ?? Clock.Now();
        return UpdatedAt;
    }
}

public static class JobTransitions
{
    private static readonly HashSet<(JobStatus, JobStatus)> Allowed =
    [
        (JobStatus.Queued, JobStatus.Running),
        (JobStatus.Queued, JobStatus.Cancelled),
        (JobStatus.Running, JobStatus.Succeeded),
        (JobStatus.Running, JobStatus.Failed),
        (JobStatus.Running, JobStatus.Cancelled),
        (JobStatus.Running, JobStatus.Queued),
    ];

    public static bool IsAllowed(JobStatus from, JobStatus to) => Allowed.Contains((from, to));

    public static string ToWire(this JobStatus status) => status.ToString().ToLowerInvariant();

    public static bool TryParse(string? value, out JobStatus status) =>
        Enum.TryParse(value, ignoreCase: true, out status) && Enum.IsDefined(status) && !int.TryParse(value, out _);
}

public sealed class InvalidJobTransitionException(JobStatus from, string to)
    : InvalidOperationException($"A {from.ToWire()} job cannot become {to}")
{
    public JobStatus From { get; } = from;
}

public static class JobEventTypes
{
    public const string Queued = "queued", Running = "running", Succeeded = "succeeded", Failed = "failed",
        Cancelled = "cancelled", CancelRequested = "cancel_requested";
}

/// <summary>Timestamps at Postgres' precision (microseconds), so a value round-trips unchanged (cursors compare them).</summary>
public static class Clock
{
    public static DateTimeOffset Now() => Truncate(DateTimeOffset.UtcNow);
    public static DateTimeOffset Truncate(DateTimeOffset t) => new(t.UtcTicks - t.UtcTicks % 10, TimeSpan.Zero);
}
