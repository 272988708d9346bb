using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;

namespace FineTune.Domain.Remote;

/// <summary>What a download produced: the file, its sha256 and size, and the URI it finally came from.</summary>
public sealed record FetchedFile(string Path, string Sha256, long Bytes, Uri FinalUri);

/// <summary>The caps of one download, with the configuration keys that set them (named in error messages).</summary>
public sealed record FetchLimits(long MaxBytes, string MaxBytesKey, TimeSpan Timeout, string TimeoutKey);

/// <summary>
/// Downloads files over HTTPS for datasets and models, with the protections a service that fetches user-given URIs
/// needs: every address a host name resolves to is checked before connecting (and the connection goes to a checked
/// address, so DNS cannot be re-pointed in between); redirects are followed by hand, at most
/// <see cref="RemoteOptions.MaxRedirects"/>, each hop checked again; no proxy; sizes capped before and while reading;
/// one deadline for the whole transfer. A download goes to a temporary name and is renamed into place only when
/// complete, so a partial file is never used.
/// </summary>
public sealed class RemoteFetcher : IDisposable
{
    private readonly RemoteOptions _options;
    private readonly IReadOnlyList<IPNetwork> _allowed;
    private readonly HttpClient _client;

    public RemoteFetcher(RemoteOptions options)
    {
        _options = options;
        _allowed = options.Networks();
        var handler = new SocketsHttpHandler
        {
            AllowAutoRedirect = false,
            UseProxy = false,
            UseCookies = false,
            AutomaticDecompression = DecompressionMethods.None,
            ConnectTimeout = options.ConnectTimeout,
            PooledConnectionLifetime = TimeSpan.FromMinutes(2),
            ConnectCallback = ConnectAsync,
        };
        _client = new HttpClient(handler) { Timeout = System.Threading.Timeout.InfiniteTimeSpan };
        _client.DefaultRequestHeaders.UserAgent.ParseAdd("finetune-service/1");
    }

    public RemoteOptions Options => _options;

    /// <summary>Whether a reference is a remote one (http[s]://), as opposed to a local path or file:// URI.</summary>
    public static bool IsRemote(string reference) =>
        reference.StartsWith("https://", StringComparison.OrdinalIgnoreCase) || reference.StartsWith("http://", StringComparison.OrdinalIgnoreCase);

    /// <summary>Parses and checks a remote reference (scheme, no credentials); throws <see cref="RemoteFetchException"/>.</summary>
    public Uri Parse(string reference)
    {
        if (reference.Length > 4096) throw new RemoteFetchException("the URI is longer than 4096 characters");
        if (!Uri.TryCreate(reference, UriKind.Absolute, out var uri) || string.IsNullOrEmpty(uri.Host))
            throw new RemoteFetchException("is not a valid absolute URI");
        CheckScheme(uri);
        if (!string.IsNullOrEmpty(uri.UserInfo)) throw new RemoteFetchException("URIs with credentials (user:password@) are not accepted");
        return uri;
    }

    /// <summary>
    /// Downloads <paramref name="uri"/> to <paramref name="destination"/> (replaced atomically). With
    /// <paramref name="optional"/> a 404 returns null instead of failing.
    /// </summary>
    public async Task<FetchedFile?> DownloadAsync(Uri uri, string destination, FetchLimits limits, bool optional = false,
        CancellationToken ct = default)
    {
        var (maxBytes, limitName, timeout, timeoutName) = (limits.MaxBytes, limits.MaxBytesKey, limits.Timeout, limits.TimeoutKey);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
        deadline.CancelAfter(timeout);
        var partial = $"{destination}.partial-{Guid.NewGuid():N}";
        try
        {
            using var response = await SendAsync(uri, deadline.Token);
            if (optional && response.StatusCode == HttpStatusCode.NotFound) return null;
            if (response.StatusCode != HttpStatusCode.OK)
                throw new RemoteFetchException($"{Show(response.RequestMessage!.RequestUri!)} answered {(int)response.StatusCode} {response.ReasonPhrase}");
            if (response.Content.Headers.ContentLength > maxBytes)
                throw new RemoteFetchException($"{Show(uri)} is {response.Content.Headers.ContentLength} bytes, over the limit of {maxBytes} bytes ({limitName})");
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(destination))!);
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            long total = 0;
            await using (var body = await response.Content.ReadAsStreamAsync(deadline.Token))
            await using (var file = new FileStream(partial, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16, useAsync: true))
            {
                var buffer = new byte[1 << 16];
                int read;
                while ((read = await body.ReadAsync(buffer, deadline.Token)) > 0)
                {
                    total += read;
                    if (total > maxBytes)
                        throw new RemoteFetchException($"{Show(uri)} is over the limit of {maxBytes} bytes ({limitName})");
                    hash.AppendData(buffer, 0, read);
                    await file.WriteAsync(buffer.AsMemory(0, read), deadline.Token);
                }
                if (response.Content.Headers.ContentLength is { } expected && expected != total)
                    throw new RemoteFetchException($"{Show(uri)} ended after {total} of {expected} bytes");
                await file.FlushAsync(deadline.Token);
                file.Flush(flushToDisk: true);
            }
            File.Move(partial, destination, overwrite: true);
            return new FetchedFile(destination, Convert.ToHexStringLower(hash.GetHashAndReset()), total, response.RequestMessage!.RequestUri!);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new RemoteFetchException($"fetching {Show(uri)} took longer than {timeout} ({timeoutName})");
        }
        catch (HttpRequestException e)
        {
            // The connect callback's refusal arrives wrapped; its message is the useful one.
            for (Exception? inner = e; inner is not null; inner = inner.InnerException)
                if (inner is RemoteFetchException refusal) throw new RemoteFetchException(refusal.Message, e);
            throw new RemoteFetchException($"fetching {Show(uri)} failed: {e.Message}", e);
        }
        catch (IOException e) when (e is not FileNotFoundException)
        {
            throw new RemoteFetchException($"fetching {Show(uri)} failed: {e.Message}", e);
        }
        finally
        {
            try { File.Delete(partial); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>GET with redirects followed by hand; the returned response has status other than 3xx.</summary>
    private async Task<HttpResponseMessage> SendAsync(Uri uri, CancellationToken ct)
    {
        var current = uri;
        for (var hop = 0; ; hop++)
        {
            CheckScheme(current);
            var response = await _client.SendAsync(new HttpRequestMessage(HttpMethod.Get, current), HttpCompletionOption.ResponseHeadersRead, ct);
            if ((int)response.StatusCode is not (301 or 302 or 303 or 307 or 308)) return response;
            var location = response.Headers.Location;
            response.Dispose();
            if (location is null) throw new RemoteFetchException($"{Show(current)} redirected without a Location");
            if (hop >= _options.MaxRedirects)
                throw new RemoteFetchException($"{Show(uri)} redirected more than {_options.MaxRedirects} times (Remote:MaxRedirects)");
            current = location.IsAbsoluteUri ? location : new Uri(current, location);
            if (!string.IsNullOrEmpty(current.UserInfo)) throw new RemoteFetchException("a redirect pointed at a URI with credentials");
        }
    }

    private void CheckScheme(Uri uri)
    {
        if (uri.Scheme == Uri.UriSchemeHttps) return;
        if (uri.Scheme == Uri.UriSchemeHttp)
        {
            if (_options.AllowHttp) return;
            throw new RemoteFetchException($"{Show(uri)}: plain http:// is not accepted, use https:// (an operator may allow http with Remote:AllowHttp)");
        }
        throw new RemoteFetchException($"{Show(uri)}: only https:// URIs can be fetched");
    }

    /// <summary>Resolves the host, refuses it if any of its addresses is not allowed, then connects to those addresses.</summary>
    private async ValueTask<Stream> ConnectAsync(SocketsHttpConnectionContext context, CancellationToken ct)
    {
        var host = context.DnsEndPoint.Host;
        IPAddress[] addresses;
        if (IPAddress.TryParse(host.Trim('[', ']'), out var literal)) addresses = [literal];
        else
        {
            try { addresses = await Dns.GetHostAddressesAsync(host, ct); }
            catch (SocketException e) { throw new RemoteFetchException($"the host '{host}' cannot be resolved: {e.Message}", e); }
        }
        if (addresses.Length == 0) throw new RemoteFetchException($"the host '{host}' has no addresses");
        // Every address, not just the first: a name that also resolves to an internal address is refused.
        foreach (var a in addresses)
            if (AddressPolicy.Refusal(a, _allowed) is { } what)
                throw new RemoteFetchException(
                    $"the host '{host}' resolves to {a}, {what}; such addresses are refused (an operator may allow a range with Remote:AllowedNetworks)");
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            await socket.ConnectAsync(addresses, context.DnsEndPoint.Port, ct);
            return new NetworkStream(socket, ownsSocket: true);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>A URI for messages: without its query (it may carry a signature).</summary>
    public static string Show(Uri uri) => uri.GetLeftPart(UriPartial.Path);

    public void Dispose() => _client.Dispose();
}
