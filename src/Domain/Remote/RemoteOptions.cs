using System.Net;
using Microsoft.Extensions.Configuration;

namespace FineTune.Domain.Remote;

/// <summary>
/// Rules for fetching datasets and models over HTTPS (section "Remote"; the API and the workers read the same).
/// Private, loopback and link-local addresses are refused unless listed in <see cref="AllowedNetworks"/>.
/// </summary>
public sealed class RemoteOptions
{
    public const string Section = "Remote";

    /// <summary>CIDR ranges of non-public addresses that may be fetched from anyway (an internal mirror, a test
    /// server), e.g. "10.20.0.0/16" or "127.0.0.1/32". Public addresses are always allowed.</summary>
    public string[] AllowedNetworks { get; set; } = [];
    /// <summary>Also accept plain http:// URIs (an internal mirror without TLS; tests). Off by default.</summary>
    public bool AllowHttp { get; set; }
    /// <summary>Redirects followed per request; every hop is checked like the first URI.</summary>
    public int MaxRedirects { get; set; } = 3;
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(10);
    /// <summary>Whole-transfer limit for one dataset or one small model file (config, tokenizer).</summary>
    public TimeSpan Timeout { get; set; } = TimeSpan.FromMinutes(5);
    /// <summary>Whole-transfer limit for one weights file (worker side).</summary>
    public TimeSpan WeightsTimeout { get; set; } = TimeSpan.FromHours(4);
    /// <summary>Largest config.json / tokenizer / index file fetched for a model.</summary>
    public long MaxFileBytes { get; set; } = 64L << 20;
    /// <summary>Largest total size of one model's weight files.</summary>
    public long MaxModelBytes { get; set; } = 256L << 30;

    public static RemoteOptions From(IConfiguration config)
    {
        var o = config.GetSection(Section).Get<RemoteOptions>() ?? new RemoteOptions();
        o.Networks(); // a bad CIDR fails at start, not at the first fetch
        return o;
    }

    public IReadOnlyList<IPNetwork> Networks() =>
    [
        .. AllowedNetworks.Where(n => !string.IsNullOrWhiteSpace(n)).Select(n => IPNetwork.TryParse(n.Trim(), out var net)
            ? net : throw new InvalidOperationException($"Remote:AllowedNetworks: '{n}' is not a CIDR range such as 10.0.0.0/8")),
    ];
}

/// <summary>A remote dataset or model that cannot be fetched; the message is meant for the API user.</summary>
public sealed class RemoteFetchException(string message, Exception? inner = null) : Exception(message, inner);
