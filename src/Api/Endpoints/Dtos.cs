using System.Text;
using System.Text.Json;
using FineTune.Api.Submission;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;

namespace FineTune.Api.Endpoints;

/// <summary>A fine-tune job as clients see it.</summary>
public sealed record JobDto(
    Guid Id, JobStatus Status, string Model, string TrainingData, string? ValidationData, MethodSpec Method,
    Hyperparameters Hyperparameters, string AdapterName, string Pool, string Priority, ProgressDto Progress,
    double? LastLoss, ErrorDto? Error, Guid? AdapterId, bool CancelRequested, int Attempt,
    DateTimeOffset CreatedAt, DateTimeOffset? StartedAt, DateTimeOffset? FinishedAt, bool Merge, QueueInfo? Queue = null)
{
    /// <summary>The training data as counted at submit (examples, tokens after truncation, truncated examples, sha256).</summary>
    public DatasetDto? Dataset { get; init; }
    public DatasetDto? ValidationDataset { get; init; }
    /// <summary>Submit-time estimate of the tokens to process and, when the pool's speed is configured, the seconds.</summary>
    public EstimateDto? Estimate { get; init; }

    public static JobDto From(FineTuneJob j) => new(
        j.Id, j.Status, j.Model, j.TrainingData, j.ValidationData, j.Method, j.Hyperparameters, j.AdapterName, j.Pool,
        Priorities.ToName(j.Priority), new ProgressDto(j.Step, j.TotalSteps), j.LastLoss,
        j.ErrorCode is null ? null : new ErrorDto(j.ErrorCode, j.ErrorMessage ?? ""), j.AdapterId, j.CancelRequested,
        j.Attempt, j.CreatedAt, j.StartedAt, j.FinishedAt, j.Merge)
    {
        Dataset = j.DatasetSha256 is null ? null
            : new DatasetDto(j.TrainingExamples, j.DatasetTokens, j.DatasetTruncated, j.DatasetSkipped, j.DatasetSha256),
        ValidationDataset = j.ValidationSha256 is null ? null
            : new DatasetDto(j.ValidationExamples, j.ValidationTokens, null, null, j.ValidationSha256),
        Estimate = j.EstimatedTokens is null ? null : new EstimateDto(j.EstimatedTokens.Value, j.EstimatedSeconds),
    };
}

/// <param name="Examples">Examples that will be trained on.</param>
/// <param name="Tokens">Their tokens, after truncation to maxSeqLength.</param>
/// <param name="Truncated">Examples cut to maxSeqLength.</param>
/// <param name="Skipped">Examples left out: once cut, nothing of their completion remained.</param>
/// <param name="Sha256">sha256 of the file's bytes; the worker refuses the job if the content changed.</param>
public sealed record DatasetDto(int? Examples, long? Tokens, int? Truncated, int? Skipped, string Sha256);
public sealed record EstimateDto(long Tokens, double? Seconds);

public sealed record ProgressDto(int Step, int TotalSteps);
public sealed record ErrorDto(string Code, string Message);

/// <summary>One page of a list; pass <c>nextCursor</c> as <c>after</c> for the next (null: last page).</summary>
public sealed record Page<T>(IReadOnlyList<T> Data, string? NextCursor);

public sealed record JobEventDto(long Id, DateTimeOffset At, string Type, string Message, JsonElement? Data)
{
    public static JobEventDto From(JobEvent e) =>
        new(e.Id, e.At, e.Type, e.Message, e.Data is null ? null : JsonDocument.Parse(e.Data).RootElement.Clone());
}

public sealed record JobMetricDto(int Step, double Loss, double LearningRate, double TokensPerSecond, double ElapsedSeconds,
    double? ValidationLoss, DateTimeOffset At)
{
    public static JobMetricDto From(JobMetric m) =>
        new(m.Step, m.Loss, m.LearningRate, m.TokensPerSecond, m.ElapsedSeconds, m.ValidationLoss, m.At);
}

public sealed record JobCheckpointDto(int Step, string Sha256, long SizeBytes, DateTimeOffset At)
{
    public static JobCheckpointDto From(JobCheckpoint c) => new(c.Step, c.Sha256, c.SizeBytes, c.At);
}

/// <summary>Opaque keyset cursor over (created_at, id), newest first.</summary>
public static class Cursor
{
    public static string Encode(DateTimeOffset at, Guid id) =>
        Convert.ToBase64String(Encoding.UTF8.GetBytes($"{at.UtcTicks}:{id:N}")).TrimEnd('=').Replace('+', '-').Replace('/', '_');

    public static bool TryDecode(string? cursor, out DateTimeOffset at, out Guid id)
    {
        at = default; id = default;
        if (string.IsNullOrEmpty(cursor) || cursor.Length > 100) return false;
        try
        {
            var b64 = cursor.Replace('-', '+').Replace('_', '/');
            var text = Encoding.UTF8.GetString(Convert.FromBase64String(b64.PadRight(b64.Length + (4 - b64.Length % 4) % 4, '=')));
            var parts = text.Split(':');
            if (parts.Length != 2 || !long.TryParse(parts[0], out var ticks) || !Guid.TryParseExact(parts[1], "N", out id)
                || ticks < DateTimeOffset.MinValue.UtcTicks || ticks > DateTimeOffset.MaxValue.UtcTicks) return false;
            at = new DateTimeOffset(ticks, TimeSpan.Zero);
            return true;
        }
        catch (FormatException)
        {
            return false;
        }
    }
}
