using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;

namespace FineTune.Tests.Shared;

/// <summary>
/// A real HTTP endpoint on 127.0.0.1 that records webhook POSTs and checks their signatures with its own HMAC code
/// (not the service's), so a signing bug cannot be mirrored by the check. <see cref="FailFirst"/> requests answer 503.
/// </summary>
public sealed class WebhookReceiver : IAsyncDisposable
{
    private readonly HttpListener _listener = new();
    private readonly Task _loop;
    private int _seen;

    public sealed record Received(string Event, string Delivery, int Attempt, string Signature, string Body, bool SignatureValid, DateTimeOffset At);

    public WebhookReceiver(int? port = null)
    {
        Port = port ?? FreePort();
        Url = $"http://127.0.0.1:{Port}/hook/";
        _listener.Prefixes.Add(Url);
        _listener.Start();
        _loop = Task.Run(LoopAsync);
    }

    public int Port { get; }
    public string Url { get; }
    /// <summary>The secret to verify with (set once the webhook is created).</summary>
    public string? Secret { get; set; }
    public int FailFirst { get; set; }
    public ConcurrentQueue<Received> Requests { get; } = new();

    public static int FreePort()
    {
        using var probe = new TcpListener(IPAddress.Loopback, 0);
        probe.Start();
        return ((IPEndPoint)probe.LocalEndpoint).Port;
    }

    /// <summary>Independent check of <c>t=&lt;unix&gt;,v1=&lt;hex HMAC-SHA256(secret, "t.body")&gt;</c>.</summary>
    public static bool Verify(string secret, string header, string body)
    {
        var parts = header.Split(',').Select(p => p.Split('=', 2)).Where(p => p.Length == 2).ToDictionary(p => p[0], p => p[1]);
        if (!parts.TryGetValue("t", out var t) || !parts.TryGetValue("v1", out var v1)) return false;
        if (Math.Abs(DateTimeOffset.UtcNow.ToUnixTimeSeconds() - long.Parse(t)) > 300) return false;
        using var hmac = new HMACSHA256(Encoding.UTF8.GetBytes(secret));
        var expected = Convert.ToHexString(hmac.ComputeHash(Encoding.UTF8.GetBytes(t + "." + body))).ToLowerInvariant();
        return CryptographicOperations.FixedTimeEquals(Encoding.ASCII.GetBytes(expected), Encoding.ASCII.GetBytes(v1));
    }

    /// <summary>Waits until <paramref name="count"/> requests matching <paramref name="match"/> arrived.</summary>
    public async Task<List<Received>> WaitForAsync(Func<Received, bool> match, int count, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var found = Requests.Where(match).ToList();
            if (found.Count >= count) return found;
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"expected {count} webhook request(s), got {found.Count}; all: {string.Join(" | ", Requests.Select(r => r.Event + " " + r.Body))}");
            await Task.Delay(50);
        }
    }

    private async Task LoopAsync()
    {
        while (_listener.IsListening)
        {
            HttpListenerContext ctx;
            try { ctx = await _listener.GetContextAsync(); }
            catch (Exception e) when (e is HttpListenerException or ObjectDisposedException or InvalidOperationException) { return; }
            string body;
            using (var reader = new StreamReader(ctx.Request.InputStream, Encoding.UTF8)) body = await reader.ReadToEndAsync();
            var signature = ctx.Request.Headers["X-Finetune-Signature"] ?? "";
            var fail = Interlocked.Increment(ref _seen) <= FailFirst;
            Requests.Enqueue(new Received(ctx.Request.Headers["X-Finetune-Event"] ?? "", ctx.Request.Headers["X-Finetune-Delivery"] ?? "",
                int.TryParse(ctx.Request.Headers["X-Finetune-Attempt"], out var a) ? a : 0, signature, body,
                Secret is not null && Verify(Secret, signature, body), DateTimeOffset.UtcNow));
            ctx.Response.StatusCode = fail ? 503 : 204;
            ctx.Response.Close();
        }
    }

    public async ValueTask DisposeAsync()
    {
        _listener.Stop();
        _listener.Close();
        try { await _loop; } catch (ObjectDisposedException) { }
    }
}
