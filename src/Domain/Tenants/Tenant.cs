using System.Security.Cryptography;
using System.Text;

namespace FineTune.Domain.Tenants;

public sealed class Tenant
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public required string Name { get; init; }
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();

    // Quotas (null: unlimited). Running jobs are limited at dispatch (a job over the limit waits queued and starts
    // once one of the tenant's jobs ends); the others are checked at submit.
    /// <summary>Jobs of the tenant running at once, over all pools.</summary>
    public int? MaxRunningJobs { get; set; }
    /// <summary>Jobs of the tenant waiting in the queue; a submit beyond it answers 429.</summary>
    public int? MaxQueuedJobs { get; set; }
    /// <summary>Submissions accepted per sliding minute; beyond it 429 with Retry-After.</summary>
    public int? MaxSubmissionsPerMinute { get; set; }
    /// <summary>Pools the tenant may submit to (null: every configured pool).</summary>
    public List<string>? AllowedPools { get; set; }
    /// <summary>Training plus validation dataset bytes of one job.</summary>
    public long? MaxDatasetBytes { get; set; }
    /// <summary>Optimizer steps of one job (maxSteps, or epochs × examples / effective batch).</summary>
    public int? MaxStepsPerJob { get; set; }
    /// <summary>Training tokens of one job (tokens per epoch, truncated to maxSeqLength, × epochs).</summary>
    public long? MaxTokensPerJob { get; set; }
    /// <summary>Highest priority the tenant's jobs may ask for: low, normal or high.</summary>
    public string MaxPriority { get; set; } = "high";
}

public sealed class ApiKey
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public Guid TenantId { get; init; }
    /// <summary>The key's first <see cref="ApiKeys.PrefixLength"/> characters: an indexed lookup before the hash compare.</summary>
    public required string Prefix { get; init; }
    /// <summary>Lowercase hex sha256 of the whole key; the key itself is never stored.</summary>
    public required string Hash { get; init; }
    public required string Role { get; init; }
    /// <summary>A label for people ("ci", "serving").</summary>
    public string? Name { get; init; }
    /// <summary>The key that created this one (null: bootstrap).</summary>
    public Guid? CreatedBy { get; init; }
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();
    public DateTimeOffset? ExpiresAt { get; set; }
    public DateTimeOffset? RevokedAt { get; set; }

    public bool IsActive(DateTimeOffset now) => RevokedAt is null && (ExpiresAt is null || ExpiresAt > now);
}

public static class Roles
{
    public const string Admin = "admin", Member = "member", Reader = "reader";
    public static readonly string[] All = [Admin, Member, Reader];
    public static bool CanWrite(string role) => role is Admin or Member;
}

/// <summary>API keys: <c>ft_</c> + 32 base62 characters, stored as a sha256.</summary>
public static class ApiKeys
{
    public const string KeyPrefix = "ft_";
    public const int PrefixLength = 8;
    private const string Alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

    private static readonly System.Buffers.SearchValues<char> AlphabetValues = System.Buffers.SearchValues.Create(Alphabet);

    public static string Generate() => KeyPrefix + RandomNumberGenerator.GetString(Alphabet, 32);

    public static string Hash(string key) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(key)));

    public static string PrefixOf(string key) => key.Length <= PrefixLength ? key : key[..PrefixLength];

    /// <summary>Whether the key has the shape of one of ours (cheap rejection before any database lookup).</summary>
    public static bool LooksValid(string key) =>
        key.Length == KeyPrefix.Length + 32 && key.StartsWith(KeyPrefix, StringComparison.Ordinal)
        && !key.AsSpan(KeyPrefix.Length).ContainsAnyExcept(AlphabetValues);

    /// <summary>Constant-time comparison of a presented key with a stored hash.</summary>
    public static bool Matches(string key, string storedHash)
    {
        Span<byte> presented = stackalloc byte[32];
        SHA256.HashData(Encoding.UTF8.GetBytes(key), presented);
        Span<byte> stored = stackalloc byte[32];
        return Convert.FromHexString(storedHash, stored, out _, out var written) == System.Buffers.OperationStatus.Done
            && written == 32 && CryptographicOperations.FixedTimeEquals(presented, stored);
    }

    public static ApiKey NewRecord(Guid tenantId, string key, string role, DateTimeOffset? expiresAt = null,
        string? name = null, Guid? createdBy = null) =>
        Roles.All.Contains(role)
            ? new ApiKey
            {
                TenantId = tenantId, Prefix = PrefixOf(key), Hash = Hash(key), Role = role, ExpiresAt = expiresAt,
                Name = name, CreatedBy = createdBy,
            }
            : throw new ArgumentException($"unknown role '{role}'", nameof(role));
}
