using System.Net;
using System.Net.Sockets;

namespace FineTune.Api.Webhooks;

/// <summary>Webhook delivery settings (section "Webhooks").</summary>
public sealed class WebhookOptions
{
    public const string Section = "Webhooks";

    /// <summary>Whether this API process delivers (any number of processes may: each claims its own rows).</summary>
    public bool Deliver { get; set; } = true;
    /// <summary>Allow URLs that are or resolve to loopback, private, link-local or other non-public addresses (tests, on-premises receivers).</summary>
    public bool AllowPrivateAddresses { get; set; }
    /// <summary>Allow http:// URLs (default: https only).</summary>
    public bool AllowInsecureHttp { get; set; }
    public TimeSpan PollInterval { get; set; } = TimeSpan.FromSeconds(1);
    /// <summary>Attempts before a delivery is marked failed.</summary>
    public int MaxAttempts { get; set; } = 8;
    /// <summary>Delay after the first failure; doubled after each further one (±20 % jitter), up to <see cref="RetryMaxDelay"/>.</summary>
    public TimeSpan RetryBaseDelay { get; set; } = TimeSpan.FromSeconds(10);
    public TimeSpan RetryMaxDelay { get; set; } = TimeSpan.FromHours(1);
    /// <summary>Per attempt, connect to last response byte.</summary>
    public TimeSpan Timeout { get; set; } = TimeSpan.FromSeconds(10);
    public int BatchSize { get; set; } = 20;
    public int MaxWebhooksPerTenant { get; set; } = 20;

    /// <summary>The wait before attempt <paramref name="attempt"/> + 1.</summary>
    public TimeSpan Backoff(int attempt, double jitter01)
    {
        var seconds = RetryBaseDelay.TotalSeconds * Math.Pow(2, Math.Max(0, attempt - 1));
        seconds = Math.Min(seconds, RetryMaxDelay.TotalSeconds) * (0.8 + 0.4 * jitter01);
        return TimeSpan.FromSeconds(seconds);
    }
}

/// <summary>
/// Where the service may send requests: the URL is checked when a webhook is saved (scheme, no credentials, literal
/// addresses), and every connection is checked again on the addresses DNS gives at that moment (so a name that
/// later resolves to 10.0.0.5 or 169.254.169.254 is refused too).
/// </summary>
public static class OutboundUrlPolicy
{
    public static string? Check(string url, WebhookOptions o)
    {
        if (url.Length > 2048) return "must be at most 2048 characters";
        if (!Uri.TryCreate(url, UriKind.Absolute, out var uri)) return "must be an absolute URL";
        if (uri.Scheme != Uri.UriSchemeHttps && !(o.AllowInsecureHttp && uri.Scheme == Uri.UriSchemeHttp))
            return o.AllowInsecureHttp ? "must be an http or https URL" : "must be an https URL";
        if (!string.IsNullOrEmpty(uri.UserInfo)) return "must not carry credentials";
        if (!string.IsNullOrEmpty(uri.Fragment)) return "must not have a fragment";
        if (o.AllowPrivateAddresses) return null;
        if (uri.IsLoopback || uri.Host.Equals("localhost", StringComparison.OrdinalIgnoreCase)
            || uri.Host.EndsWith(".localhost", StringComparison.OrdinalIgnoreCase))
            return "must not point at this machine (loopback)";
        if (IPAddress.TryParse(uri.Host.Trim('[', ']'), out var ip) && !IsPublic(ip))
            return $"must not point at a private or reserved address ({ip})";
        return null;
    }

    /// <summary>Public unicast only: not loopback, private (RFC 1918, ULA), CGNAT, link-local (incl. cloud metadata),
    /// multicast, documentation, benchmark or reserved ranges.</summary>
    public static bool IsPublic(IPAddress address)
    {
        if (address.IsIPv4MappedToIPv6) address = address.MapToIPv4();
        if (IPAddress.IsLoopback(address)) return false;
        var b = address.GetAddressBytes();
        if (address.AddressFamily == AddressFamily.InterNetwork)
            return !(b[0] is 0 or 10 or 127 or >= 224
                || b[0] == 100 && b[1] is >= 64 and < 128
                || b[0] == 169 && b[1] == 254
                || b[0] == 172 && b[1] is >= 16 and < 32
                || b[0] == 192 && b[1] == 168
                || b[0] == 192 && b[1] == 0 && b[2] is 0 or 2
                || b[0] == 198 && b[1] is 18 or 19
                || b[0] == 198 && b[1] == 51 && b[2] == 100
                || b[0] == 203 && b[1] == 0 && b[2] == 113);
        if (address.AddressFamily == AddressFamily.InterNetworkV6)
            return !(address.Equals(IPAddress.IPv6Any) || address.IsIPv6LinkLocal || address.IsIPv6SiteLocal || address.IsIPv6Multicast
                || (b[0] & 0xFE) == 0xFC                      // fc00::/7 unique local
                || b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x0D && b[3] == 0xB8   // 2001:db8::/32 documentation
                || b[0] == 0x00 && b.Take(10).All(x => x == 0)); // ::/80 (IPv4-compatible, unspecified)
        return false;
    }
}
