using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using FineTune.Domain.Webhooks;
using Microsoft.Extensions.Options;
using Npgsql;

namespace FineTune.Api.Webhooks;

/// <summary>
/// Delivers the outbox (webhook_deliveries): claims due rows with <c>FOR UPDATE SKIP LOCKED</c> and a lock
/// deadline (so several API processes share the work and a crashed one's rows come back after the deadline), POSTs
/// each signed body, and records the attempt: delivered on 2xx, else retried with exponential backoff until
/// <see cref="WebhookOptions.MaxAttempts"/>, then failed. At-least-once: receivers dedupe on X-Finetune-Delivery.
/// </summary>
public sealed class WebhookDeliveryService(NpgsqlDataSource db, IOptions<WebhookOptions> options, ILogger<WebhookDeliveryService> log)
    : BackgroundService
{
    private readonly WebhookOptions _o = options.Value;

    public static HttpClient CreateClient(WebhookOptions o) => new(new SocketsHttpHandler
    {
        AllowAutoRedirect = false, // a redirect could lead anywhere: it counts as a failed attempt
        UseCookies = false,
        PooledConnectionLifetime = TimeSpan.FromMinutes(5),
        ConnectTimeout = o.Timeout,
        ConnectCallback = async (context, ct) =>
        {
            var host = context.DnsEndPoint.Host;
            var addresses = IPAddress.TryParse(host, out var literal) ? [literal] : await Dns.GetHostAddressesAsync(host, ct);
            var allowed = addresses.Where(a => o.AllowPrivateAddresses || OutboundUrlPolicy.IsPublic(a)).ToArray();
            if (allowed.Length == 0)
                throw new HttpRequestException($"{host} resolves only to private or reserved addresses; refused.");
            var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                await socket.ConnectAsync(allowed, context.DnsEndPoint.Port, ct);
                return new NetworkStream(socket, ownsSocket: true);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        },
    })
    { Timeout = o.Timeout };

    protected override async Task ExecuteAsync(CancellationToken ct)
    {
        if (!_o.Deliver) return;
        using var http = CreateClient(_o);
        while (!ct.IsCancellationRequested)
        {
            var sent = 0;
            try
            {
                var batch = await ClaimAsync(ct);
                sent = batch.Count;
                await Task.WhenAll(batch.Select(d => DeliverAsync(http, d, ct)));
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested) { return; }
            catch (Exception e) when (e is NpgsqlException or InvalidOperationException or TimeoutException)
            {
                log.LogWarning(e, "Webhook delivery pass failed; trying again");
            }
            if (sent == _o.BatchSize) continue; // more may be due
            try { await Task.Delay(_o.PollInterval, ct); }
            catch (OperationCanceledException) { return; }
        }
    }

    private sealed record Claimed(Guid Id, Guid WebhookId, string EventType, string Payload, int Attempt, string Url, string Secret);

    private async Task<List<Claimed>> ClaimAsync(CancellationToken ct)
    {
        await using var cmd = db.CreateCommand("""
            UPDATE webhook_deliveries d SET locked_until = now() + @lock, attempts = d.attempts + 1, last_attempt_at = now()
              FROM webhooks w
             WHERE w.id = d.webhook_id AND d.id IN (
                   SELECT x.id FROM webhook_deliveries x JOIN webhooks xw ON xw.id = x.webhook_id AND xw.enabled
                    WHERE x.status = 'pending' AND x.next_attempt_at <= now() AND (x.locked_until IS NULL OR x.locked_until < now())
                    ORDER BY x.next_attempt_at LIMIT @batch FOR UPDATE OF x SKIP LOCKED)
            RETURNING d.id, d.webhook_id, d.event_type, d.payload, d.attempts, w.url, w.secret
            """);
        cmd.Parameters.AddWithValue("lock", _o.Timeout + TimeSpan.FromSeconds(30));
        cmd.Parameters.AddWithValue("batch", _o.BatchSize);
        var list = new List<Claimed>();
        await using var r = await cmd.ExecuteReaderAsync(ct);
        while (await r.ReadAsync(ct))
            list.Add(new Claimed(r.GetGuid(0), r.GetGuid(1), r.GetString(2), r.GetString(3), r.GetInt32(4), r.GetString(5), r.GetString(6)));
        return list;
    }

    private async Task DeliverAsync(HttpClient http, Claimed d, CancellationToken ct)
    {
        var started = Stopwatch.GetTimestamp();
        int? code = null;
        string? error = null;
        try
        {
            if (OutboundUrlPolicy.Check(d.Url, _o) is { } refused) throw new HttpRequestException($"URL refused: {refused}");
            using var request = new HttpRequestMessage(HttpMethod.Post, d.Url)
            {
                Content = new StringContent(d.Payload, Encoding.UTF8, "application/json"),
            };
            var now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            request.Headers.Add(WebhookSignature.Header, WebhookSignature.HeaderValue(d.Secret, now, d.Payload));
            request.Headers.Add("X-Finetune-Event", d.EventType);
            request.Headers.Add("X-Finetune-Delivery", d.Id.ToString());
            request.Headers.Add("X-Finetune-Attempt", d.Attempt.ToString());
            request.Headers.UserAgent.ParseAdd("FineTune-Webhooks/1");
            using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
            code = (int)response.StatusCode;
            if (code is < 200 or >= 300) error = $"HTTP {code}";
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            return; // shutting down: the lock deadline hands the row to the next pass
        }
        catch (Exception e) when (e is HttpRequestException or TaskCanceledException or SocketException or IOException)
        {
            error = e is TaskCanceledException ? $"timed out after {_o.Timeout.TotalSeconds:0.#} s" : e.Message;
        }
        var ms = Stopwatch.GetElapsedTime(started).TotalMilliseconds;
        var status = error is null ? DeliveryStatus.Delivered : d.Attempt >= _o.MaxAttempts ? DeliveryStatus.Failed : DeliveryStatus.Pending;
        var next = DateTimeOffset.UtcNow + (status == DeliveryStatus.Pending ? _o.Backoff(d.Attempt, Random.Shared.NextDouble()) : TimeSpan.Zero);
        if (error is not null && error.Length > 500) error = error[..500];
        try
        {
            // Fenced on the attempt number: if our lock ran out and another process took the row, its record wins.
            await using var cmd = db.CreateCommand("""
                UPDATE webhook_deliveries SET status = @status, next_attempt_at = @next, locked_until = NULL,
                       last_status_code = @code, last_error = @error,
                       delivered_at = CASE WHEN @status = 'delivered' THEN now() END,
                       attempt_log = attempt_log || jsonb_build_array(jsonb_build_object('attempt', attempts, 'at', last_attempt_at,
                           'statusCode', @code, 'error', @error, 'durationMs', round(@ms::numeric, 1)))
                 WHERE id = @id AND attempts = @attempt
                """);
            cmd.Parameters.AddWithValue("status", status);
            cmd.Parameters.AddWithValue("next", next);
            cmd.Parameters.AddWithValue("code", NpgsqlTypes.NpgsqlDbType.Integer, (object?)code ?? DBNull.Value);
            cmd.Parameters.AddWithValue("error", NpgsqlTypes.NpgsqlDbType.Text, (object?)error ?? DBNull.Value);
            cmd.Parameters.AddWithValue("ms", ms);
            cmd.Parameters.AddWithValue("id", d.Id);
            cmd.Parameters.AddWithValue("attempt", d.Attempt);
            await cmd.ExecuteNonQueryAsync(CancellationToken.None);
        }
        catch (NpgsqlException e)
        {
            log.LogWarning(e, "Recording webhook delivery {DeliveryId} failed; it is retried after its lock expires", d.Id);
        }
        if (error is not null)
            log.LogInformation("Webhook delivery {DeliveryId} ({EventType}) attempt {Attempt} failed: {Error}; now {Status}",
                d.Id, d.EventType, d.Attempt, error, status);
    }
}
