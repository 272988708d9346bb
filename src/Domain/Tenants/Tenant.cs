using System.Security.Cryptography;
using System.Text;

namespace FineTune.Domain.Tenants;

public sealed class Tenant
{
    public Guid Id { get; init; } = Guid.CreateVersion7();
    public required string Name { get; init; }
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();
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

    public static ApiKey NewRecord(Guid tenantId, string key, string role, DateTimeOffset? expiresAt = null) =>
        Roles.All.Contains(role)
            ? new ApiKey { TenantId = tenantId, Prefix = PrefixOf(key), Hash = Hash(key), Role = role, ExpiresAt = expiresAt }
            : throw new ArgumentException($"unknown role '{role}'", nameof(role));
}
