using System.Text.Json;

namespace FineTune.Domain.Jobs;

/// <summary>An entry of a job's history: every status change, plus whatever the runner reports (retries, checkpoints).</summary>
public sealed class JobEvent
{
    public long Id { get; init; }
    public Guid JobId { get; init; }
    public DateTimeOffset At { get; init; }
    public required string Type { get; init; }
    public required string Message { get; init; }
    /// <summary>Optional structured details, stored as jsonb text.</summary>
    public string? Data { get; init; }

    public static JobEvent Create(Guid jobId, string type, string message, DateTimeOffset at, object? data = null) => new()
    {
        JobId = jobId, Type = type, Message = message, At = at,
        Data = data is null ? null : JsonSerializer.Serialize(data, DomainJson.Options),
    };
}

/// <summary>Training progress at one optimizer step.</summary>
public sealed record JobMetric
{
    public Guid JobId { get; init; }
    public int Step { get; init; }
    public double Loss { get; init; }
    public double LearningRate { get; init; }
    public double TokensPerSecond { get; init; }
    public double ElapsedSeconds { get; init; }
    public double? ValidationLoss { get; init; }
    public DateTimeOffset At { get; init; } = Clock.Now();
}

/// <summary>A checkpoint written by the runner (folder under the artifact root) with the sha256 of its manifest.</summary>
public sealed record JobCheckpoint
{
    public Guid JobId { get; init; }
    public int Step { get; init; }
    public required string Path { get; init; }
    public required string Sha256 { get; init; }
    public long SizeBytes { get; init; }
    public DateTimeOffset At { get; init; } = Clock.Now();
}
