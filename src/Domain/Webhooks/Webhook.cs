using System.Security.Cryptography;
using System.Text;

namespace FineTune.Domain.Webhooks;

/// <summary>A tenant's callback URL and the events it wants.</summary>
public sealed class Webhook
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid TenantId { get; init; }
    public required string Url { get; set; }
    /// <summary>The HMAC key (<c>whsec_…</c>): stored in clear because signing needs it; shown once at creation.</summary>
    public required string Secret { get; init; }
    public List<string> Events { get; set; } = [];
    public string? Description { get; set; }
    public bool Enabled { get; set; } = true;
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();
    public DateTimeOffset UpdatedAt { get; set; } = Jobs.Clock.Now();
}

/// <summary>One event for one webhook: the outbox row, and then the delivery log entry.</summary>
public sealed class WebhookDelivery
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid WebhookId { get; init; }
    public Guid TenantId { get; init; }
    public Guid EventId { get; init; }
    public required string EventType { get; init; }
    /// <summary>The body, byte for byte as signed and sent.</summary>
    public required string Payload { get; init; }
    public string Status { get; set; } = DeliveryStatus.Pending;
    public int Attempts { get; set; }
    public DateTimeOffset NextAttemptAt { get; set; } = Jobs.Clock.Now();
    public DateTimeOffset? LockedUntil { get; set; }
    public DateTimeOffset? LastAttemptAt { get; set; }
    public int? LastStatusCode { get; set; }
    public string? LastError { get; set; }
    /// <summary>jsonb array of {attempt, at, statusCode, error, durationMs}.</summary>
    public string AttemptLog { get; set; } = "[]";
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();
    public DateTimeOffset? DeliveredAt { get; set; }
}

public static class WebhookEvents
{
    public const string JobSucceeded = "job.succeeded", JobFailed = "job.failed", JobCancelled = "job.cancelled",
        AliasMoved = "alias.moved", Ping = "ping";
    public static readonly string[] All = [JobSucceeded, JobFailed, JobCancelled, AliasMoved];
}

public static class DeliveryStatus
{
    public const string Pending = "pending", Delivered = "delivered", Failed = "failed";
    public static readonly string[] All = [Pending, Delivered, Failed];
}

/// <summary>
/// The signature header: <c>X-Finetune-Signature: t=&lt;unix seconds&gt;,v1=&lt;hex HMAC-SHA256(secret, "&lt;t&gt;." + body)&gt;</c>.
/// Receivers recompute it over the raw body, compare in constant time and reject a <c>t</c> too far from their clock
/// (5 minutes is the suggested tolerance), which stops replays.
/// </summary>
public static class WebhookSignature
{
    public const string Header = "X-Finetune-Signature";
    public const string SecretPrefix = "whsec_";

    public static string NewSecret() =>
        SecretPrefix + RandomNumberGenerator.GetString("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", 40);

    public static string Compute(string secret, long unixSeconds, string body) =>
        Convert.ToHexStringLower(HMACSHA256.HashData(Encoding.UTF8.GetBytes(secret), Encoding.UTF8.GetBytes($"{unixSeconds}.{body}")));

    public static string HeaderValue(string secret, long unixSeconds, string body) => $"t={unixSeconds},v1={Compute(secret, unixSeconds, body)}";

    /// <summary>Checks a header value against the body; what a receiver does.</summary>
    public static bool Verify(string secret, string? header, string body, DateTimeOffset now, TimeSpan tolerance)
    {
        if (string.IsNullOrEmpty(header)) return false;
        long? t = null;
        var signatures = new List<string>();
        foreach (var part in header.Split(','))
        {
            var kv = part.Split('=', 2);
            if (kv.Length != 2) continue;
            if (kv[0] == "t" && long.TryParse(kv[1], out var ts)) t = ts;
            else if (kv[0] == "v1") signatures.Add(kv[1]);
        }
        if (t is null || Math.Abs(now.ToUnixTimeSeconds() - t.Value) > tolerance.TotalSeconds) return false;
        var expected = Encoding.ASCII.GetBytes(Compute(secret, t.Value, body));
        return signatures.Any(s => CryptographicOperations.FixedTimeEquals(expected, Encoding.ASCII.GetBytes(s)));
    }
}
