using System.Text.RegularExpressions;
using FineTune.Api.Infrastructure;
using FineTune.Api.Submission;
using FineTune.Domain.Jobs;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tenancy;

/// <summary>A tenant's limits; null means unlimited.</summary>
/// <param name="MaxRunningJobs">Jobs running at once over all pools. Enforced at dispatch: a job over it waits
/// queued and starts once one of the tenant's jobs ends.</param>
/// <param name="MaxQueuedJobs">Jobs waiting in the queue; a submit beyond it answers 429.</param>
/// <param name="MaxSubmissionsPerMinute">Accepted submissions per sliding minute; beyond it 429 with Retry-After.</param>
/// <param name="AllowedPools">Pools the tenant may use (null: every configured pool).</param>
/// <param name="MaxDatasetBytes">Training plus validation dataset bytes of one job (422 beyond).</param>
/// <param name="MaxStepsPerJob">Optimizer steps of one job (422 beyond).</param>
/// <param name="MaxTokensPerJob">Training tokens of one job: tokens per epoch (each example cut to maxSeqLength) × epochs (422 beyond).</param>
/// <param name="MaxPriority">Highest priority a job may ask for: low, normal or high (422 beyond).</param>
public sealed record QuotasDto(
    int? MaxRunningJobs = null, int? MaxQueuedJobs = null, int? MaxSubmissionsPerMinute = null,
    IReadOnlyList<string>? AllowedPools = null, long? MaxDatasetBytes = null, int? MaxStepsPerJob = null,
    long? MaxTokensPerJob = null, string MaxPriority = Priorities.High)
{
    public static QuotasDto From(Tenant t) => new(t.MaxRunningJobs, t.MaxQueuedJobs, t.MaxSubmissionsPerMinute, t.AllowedPools,
        t.MaxDatasetBytes, t.MaxStepsPerJob, t.MaxTokensPerJob, t.MaxPriority);

    public void ApplyTo(Tenant t)
    {
        t.MaxRunningJobs = MaxRunningJobs; t.MaxQueuedJobs = MaxQueuedJobs; t.MaxSubmissionsPerMinute = MaxSubmissionsPerMinute;
        t.AllowedPools = AllowedPools?.ToList(); t.MaxDatasetBytes = MaxDatasetBytes; t.MaxStepsPerJob = MaxStepsPerJob;
        t.MaxTokensPerJob = MaxTokensPerJob; t.MaxPriority = MaxPriority;
    }

    /// <summary>Field errors keyed "<paramref name="prefix"/>.maxRunningJobs" etc.</summary>
    public Dictionary<string, string[]> Validate(string prefix, IReadOnlyCollection<string> configuredPools)
    {
        var errors = new Dictionary<string, string[]>();
        void Min(string name, long? value, long min)
        {
            if (value < min) errors[$"{prefix}.{name}"] = [$"must be at least {min} (or null for no limit)"];
        }
        Min("maxRunningJobs", MaxRunningJobs, 0);
        Min("maxQueuedJobs", MaxQueuedJobs, 0);
        Min("maxSubmissionsPerMinute", MaxSubmissionsPerMinute, 1);
        Min("maxDatasetBytes", MaxDatasetBytes, 1);
        Min("maxStepsPerJob", MaxStepsPerJob, 1);
        Min("maxTokensPerJob", MaxTokensPerJob, 1);
        if (AllowedPools is { } pools)
        {
            if (pools.Count > 100) errors[$"{prefix}.allowedPools"] = ["at most 100 pools"];
            else if (pools.FirstOrDefault(p => !configuredPools.Contains(p)) is { } unknown)
                errors[$"{prefix}.allowedPools"] = [$"unknown pool '{unknown}'; configured: {string.Join(", ", configuredPools)}"];
        }
        if (!Priorities.All.Contains(MaxPriority)) errors[$"{prefix}.maxPriority"] = ["must be one of: low, normal, high"];
        return errors;
    }
}

/// <summary>What a tenant uses now, against its quotas.</summary>
public sealed record UsageDto(int RunningJobs, int QueuedJobs, int SubmissionsLastMinute)
{
    public static async Task<UsageDto> ReadAsync(FineTuneDbContext db, Guid tenant, CancellationToken ct)
    {
        var row = await db.Database.SqlQuery<UsageRow>($"""
            SELECT count(*) FILTER (WHERE status = 'running')::int AS "Running",
                   count(*) FILTER (WHERE status = 'queued')::int AS "Queued",
                   count(*) FILTER (WHERE created_at > now() - interval '1 minute')::int AS "Recent"
              FROM fine_tune_jobs WHERE tenant_id = {tenant}
            """).SingleAsync(ct);
        return new UsageDto(row.Running, row.Queued, row.Recent);
    }

    private sealed class UsageRow
    {
        public int Running { get; init; }
        public int Queued { get; init; }
        public int Recent { get; init; }
    }
}

/// <summary>
/// Submit-time quota checks. A job too large for the tenant (pool, priority, dataset size, steps, tokens) is refused
/// with 422 naming the field, the limit and the job's value; a tenant over its queue or rate (concurrency) limits is
/// refused with 429 and its current usage. Running jobs are not refused here: the dispatcher starts a job once the
/// tenant has a running slot free (see FairQueue).
/// </summary>
public static class QuotaCheck
{
    /// <summary>The 422 checks; null when the job fits.</summary>
    public static ProblemHttpResult? CheckJob(Tenant t, ValidSubmission s)
    {
        if (t.AllowedPools is { } pools && !pools.Contains(s.Pool))
            return TooLarge("pool", $"the tenant may not use pool '{s.Pool}'; allowed: {string.Join(", ", pools)}", "allowedPools", pools, s.Pool);
        if (Array.IndexOf(Priorities.All, s.Priority) > Array.IndexOf(Priorities.All, t.MaxPriority))
            return TooLarge("priority", $"must be at most '{t.MaxPriority}' for this tenant", "maxPriority", t.MaxPriority, s.Priority);
        if (t.MaxDatasetBytes is null && t.MaxStepsPerJob is null && t.MaxTokensPerJob is null) return null;

        // The submission's dataset check has read, tokenized and counted the datasets already (local or https), and
        // its estimate counts steps and tokens the way the trainer will (packing and the validation split included).
        if (t.MaxDatasetBytes is { } maxBytes)
        {
            var bytes = (s.Training?.Bytes ?? 0) + (s.Validation?.Bytes ?? 0);
            if (bytes > maxBytes)
                return TooLarge("trainingData", $"the datasets are {bytes} bytes; the tenant's limit is {maxBytes}", "maxDatasetBytes", maxBytes, bytes);
        }
        if (s.Estimate is not { } estimate) return null;   // refused by validation already
        var hp = s.Hyperparameters;
        if (t.MaxStepsPerJob is { } maxSteps && estimate.Steps > maxSteps)
            return TooLarge(hp.MaxSteps is null ? "hyperparameters.epochs" : "hyperparameters.maxSteps",
                $"the job plans {estimate.Steps} optimizer steps; the tenant's limit is {maxSteps}", "maxStepsPerJob", maxSteps, estimate.Steps);
        if (t.MaxTokensPerJob is { } maxTokens && estimate.Tokens > maxTokens)
            return TooLarge("trainingData", $"the job trains on about {estimate.Tokens} tokens; the tenant's limit is {maxTokens}", "maxTokensPerJob", maxTokens, estimate.Tokens);
        return null;
    }

    /// <summary>The 429 checks, run under the tenant's submit lock in the inserting transaction; null when admitted.</summary>
    public static async Task<ProblemHttpResult?> CheckUsageAsync(FineTuneDbContext db, HttpResponse response, Tenant t, CancellationToken ct)
    {
        if (t.MaxQueuedJobs is null && t.MaxSubmissionsPerMinute is null) return null;
        var usage = await UsageDto.ReadAsync(db, t.Id, ct);
        if (t.MaxQueuedJobs is { } maxQueued && usage.QueuedJobs >= maxQueued)
            return TooMany($"The tenant has {usage.QueuedJobs} queued jobs; its limit is {maxQueued}. Submit again once one has started.",
                "maxQueuedJobs", maxQueued, usage.QueuedJobs, usage);
        if (t.MaxSubmissionsPerMinute is { } perMinute && usage.SubmissionsLastMinute >= perMinute)
        {
            var since = Clock.Now().AddMinutes(-1);
            var oldest = await db.Jobs.Where(j => j.TenantId == t.Id && j.CreatedAt > since)
                .OrderByDescending(j => j.CreatedAt).Skip(perMinute - 1).Select(j => (DateTimeOffset?)j.CreatedAt).FirstOrDefaultAsync(ct);
            var retry = oldest is { } o ? Math.Max(1, (int)Math.Ceiling((o.AddMinutes(1) - DateTimeOffset.UtcNow).TotalSeconds)) : 60;
            response.Headers.RetryAfter = retry.ToString();
            return TooMany($"The tenant submitted {usage.SubmissionsLastMinute} jobs in the last minute; its limit is {perMinute}. Retry in {retry} s.",
                "maxSubmissionsPerMinute", perMinute, usage.SubmissionsLastMinute, usage);
        }
        return null;
    }

    private static ProblemHttpResult TooLarge(string field, string message, string limit, object max, object actual) =>
        JsonBody.Unprocessable(new Dictionary<string, string[]> { [field] = [message] }, "The job exceeds the tenant's quota",
            new Dictionary<string, object?> { ["quota"] = new { limit, max, actual } });

    private static ProblemHttpResult TooMany(string detail, string limit, int max, int current, UsageDto usage) =>
        TypedResults.Problem(detail, statusCode: 429, title: "Quota exceeded",
            extensions: new Dictionary<string, object?> { ["quota"] = new { limit, max, current }, ["usage"] = usage });
}

/// <summary>Names of tenants, aliases, tags: lowercase, digits and . _ - (tags also :).</summary>
public static partial class Names
{
    [GeneratedRegex("^[a-z0-9][a-z0-9._-]{0,63}$")] public static partial Regex Slug();
    [GeneratedRegex("^[a-z0-9][a-z0-9._:-]{0,63}$")] public static partial Regex Tag();
    [GeneratedRegex("^v?[0-9]+$")] public static partial Regex VersionReference();
}
