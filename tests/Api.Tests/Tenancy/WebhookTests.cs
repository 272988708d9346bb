using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using FineTune.Api.Webhooks;
using FineTune.Domain.Tenants;
using FineTune.Domain.Webhooks;
using FineTune.Tests.Shared;
using Microsoft.AspNetCore.Hosting;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace FineTune.Api.Tests.Tenancy;

/// <summary>The API with webhooks allowed to reach this machine (a test receiver on 127.0.0.1) and fast retries.</summary>
public sealed class WebhookApiFactory : ApiFactory
{
    protected override void ConfigureWebHost(IWebHostBuilder builder)
    {
        base.ConfigureWebHost(builder);
        builder.UseSetting("Webhooks:AllowPrivateAddresses", "true");
        builder.UseSetting("Webhooks:AllowInsecureHttp", "true");
        builder.UseSetting("Webhooks:PollInterval", "00:00:00.100");
        builder.UseSetting("Webhooks:RetryBaseDelay", "00:00:00.100");
        builder.UseSetting("Webhooks:MaxAttempts", "3");
    }
}

/// <summary>Signed webhooks from the outbox, through a real HTTP receiver: events, signatures, retries, the delivery log.</summary>
public sealed class WebhookTests(WebhookApiFactory api) : IClassFixture<WebhookApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(30);

    private static async Task<JsonElement> Ok(HttpResponseMessage r)
    {
        var body = await r.Content.ReadAsStringAsync(Ct);
        Assert.True(r.IsSuccessStatusCode, $"{r.RequestMessage?.Method} {r.RequestMessage?.RequestUri} → {(int)r.StatusCode}: {body}");
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    private static async Task<(Guid Id, string Secret)> HookAsync(HttpClient client, WebhookReceiver receiver, object? events = null)
    {
        var created = await Ok(await client.PostAsJsonAsync<object>("/v1/webhooks", events is null ? new { url = receiver.Url } : new { url = receiver.Url, events }, Ct));
        receiver.Secret = created.GetProperty("secret").GetString()!;
        Assert.StartsWith(WebhookSignature.SecretPrefix, receiver.Secret);
        return (created.GetProperty("id").GetGuid(), receiver.Secret);
    }

    private static async Task<JsonElement> DeliveriesWhenSettledAsync(HttpClient client, Guid hook, int count)
    {
        var deadline = DateTime.UtcNow + Wait;
        while (true)
        {
            var page = await Ok(await client.GetAsync($"/v1/webhooks/{hook}/deliveries", Ct));
            var data = page.GetProperty("data");
            if (data.GetArrayLength() >= count && data.EnumerateArray().All(d => d.GetProperty("status").GetString() != "pending")) return data;
            Assert.True(DateTime.UtcNow < deadline, $"deliveries did not settle: {data}");
            await Task.Delay(50, Ct);
        }
    }

    [Fact]
    public async Task Job_and_alias_events_arrive_signed_from_the_outbox_and_the_log_lists_them()
    {
        await using var receiver = new WebhookReceiver();
        var client = await api.ClientAsync("hooks-events", Roles.Member);
        var (hook, secret) = await HookAsync(client, receiver);
        Assert.DoesNotContain(secret, (await Ok(await client.GetAsync($"/v1/webhooks/{hook}", Ct))).GetRawText());

        var job = (await Ok(await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct))).GetProperty("id").GetGuid();
        await Ok(await client.PostAsync($"/v1/fine-tunes/{job}/cancel", null, Ct));
        // The outbox row was committed with the cancel itself: it is there when the call returns.
        await using (var db = api.Db())
            Assert.Equal(1, await db.WebhookDeliveries.CountAsync(d => d.WebhookId == hook && d.EventType == "job.cancelled", Ct));
        await RegistryData.AddAsync(api, "hooks-events", "router", 1);
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/router/aliases/production", new { version = 1 }, Ct));
        await Ok(await client.PutAsJsonAsync("/v1/adapters/tasks/router/aliases/production", new { version = 1 }, Ct)); // not a move

        var cancelled = (await receiver.WaitForAsync(r => r.Event == "job.cancelled", 1, Wait)).Single();
        var moved = (await receiver.WaitForAsync(r => r.Event == "alias.moved", 1, Wait)).Single();
        foreach (var r in new[] { cancelled, moved })
        {
            Assert.True(r.SignatureValid, $"bad signature {r.Signature} for {r.Body}");
            Assert.False(WebhookReceiver.Verify(secret, r.Signature, r.Body + " "), "a changed body must not verify");
            Assert.False(WebhookReceiver.Verify(WebhookSignature.NewSecret(), r.Signature, r.Body), "another secret must not verify");
            Assert.Matches("^t=[0-9]+,v1=[0-9a-f]{64}$", r.Signature);
        }
        var body = JsonDocument.Parse(cancelled.Body).RootElement;
        Assert.Equal("job.cancelled", body.GetProperty("type").GetString());
        Assert.Equal(job, body.GetProperty("data").GetProperty("jobId").GetGuid());
        Assert.Equal("cancelled", body.GetProperty("data").GetProperty("status").GetString());
        var alias = JsonDocument.Parse(moved.Body).RootElement.GetProperty("data");
        Assert.Equal("router", alias.GetProperty("task").GetString());
        Assert.Equal(1, alias.GetProperty("version").GetInt32());
        Assert.Equal(JsonValueKind.Null, alias.GetProperty("previousVersion").ValueKind);

        var log = await DeliveriesWhenSettledAsync(client, hook, 2);
        Assert.Equal(2, log.GetArrayLength());
        Assert.All(log.EnumerateArray(), d =>
        {
            Assert.Equal("delivered", d.GetProperty("status").GetString());
            Assert.Equal(1, d.GetProperty("attempts").GetInt32());
            Assert.Equal(204, d.GetProperty("lastStatusCode").GetInt32());
        });
        Assert.Contains(log.EnumerateArray(), d => d.GetProperty("id").GetString() == cancelled.Delivery);
    }

    [Fact]
    public async Task Failed_attempts_are_retried_then_marked_failed_and_a_redelivery_succeeds()
    {
        await using var receiver = new WebhookReceiver { FailFirst = 2 };
        var client = await api.ClientAsync("hooks-retry", Roles.Member);
        var (hook, _) = await HookAsync(client, receiver, new[] { "job.succeeded" });
        var ping = await Ok(await client.PostAsync($"/v1/webhooks/{hook}/ping", null, Ct));

        var attempts = await receiver.WaitForAsync(r => r.Event == "ping", 3, Wait);
        Assert.Equal([1, 2, 3], attempts.Select(a => a.Attempt));
        Assert.Single(attempts.Select(a => a.Delivery).Distinct());
        Assert.All(attempts, a => Assert.True(a.SignatureValid));
        var delivered = (await DeliveriesWhenSettledAsync(client, hook, 1)).EnumerateArray().Single();
        Assert.Equal(ping.GetProperty("id").GetString(), delivered.GetProperty("id").GetString());
        Assert.Equal("delivered", delivered.GetProperty("status").GetString());
        Assert.Equal([503, 503, 204], delivered.GetProperty("attemptLog").EnumerateArray().Select(a => a.GetProperty("statusCode").GetInt32()));

        // A receiver that keeps failing: after MaxAttempts (3 here) the delivery is failed, and stays so…
        receiver.FailFirst = int.MaxValue;
        var second = await Ok(await client.PostAsync($"/v1/webhooks/{hook}/ping", null, Ct));
        var id = second.GetProperty("id").GetGuid();
        var failed = (await DeliveriesWhenSettledAsync(client, hook, 2)).EnumerateArray().Single(d => d.GetProperty("id").GetGuid() == id);
        Assert.Equal("failed", failed.GetProperty("status").GetString());
        Assert.Equal(3, failed.GetProperty("attempts").GetInt32());
        Assert.Equal("HTTP 503", failed.GetProperty("lastError").GetString());
        Assert.Equal(1, (await Ok(await client.GetAsync($"/v1/webhooks/{hook}/deliveries?status=failed", Ct))).GetProperty("data").GetArrayLength());
        // …until it is redelivered.
        receiver.FailFirst = 0;
        await Ok(await client.PostAsync($"/v1/webhooks/{hook}/deliveries/{id}/redeliver", null, Ct));
        var redelivered = (await DeliveriesWhenSettledAsync(client, hook, 2)).EnumerateArray().Single(d => d.GetProperty("id").GetGuid() == id);
        Assert.Equal("delivered", redelivered.GetProperty("status").GetString());
        Assert.Equal(4, redelivered.GetProperty("attemptLog").GetArrayLength());

        // A disabled webhook is not called; deleting it removes its log.
        await Ok(await client.PatchAsJsonAsync($"/v1/webhooks/{hook}", new { enabled = false }, Ct));
        Assert.False((await Ok(await client.GetAsync($"/v1/webhooks/{hook}", Ct))).GetProperty("enabled").GetBoolean());
        Assert.Equal(HttpStatusCode.NoContent, (await client.DeleteAsync($"/v1/webhooks/{hook}", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync($"/v1/webhooks/{hook}/deliveries", Ct)).StatusCode);
    }

    [Fact]
    public async Task A_delivery_claimed_by_a_sender_that_crashed_is_delivered_once_its_lock_expires()
    {
        await using var receiver = new WebhookReceiver();
        var client = await api.ClientAsync("hooks-crash", Roles.Member);
        var (hook, _) = await HookAsync(client, receiver);
        var deliveryId = Guid.NewGuid();
        // What a process leaves behind when it dies mid-send: attempt 1 claimed, its lock deadline passed.
        await using (var conn = new NpgsqlConnection(api.Database.ConnectionString))
        {
            await conn.OpenAsync(Ct);
            await using var cmd = new NpgsqlCommand("""
                INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, event_id, event_type, payload, status, attempts, next_attempt_at,
                                                locked_until, last_attempt_at, created_at)
                SELECT $1, id, tenant_id, gen_random_uuid(), 'job.succeeded', '{"type":"job.succeeded","data":{}}', 'pending', 1,
                       now() - interval '1 minute', now() - interval '1 second', now() - interval '1 minute', now() - interval '1 minute'
                  FROM webhooks WHERE id = $2
                """, conn);
            cmd.Parameters.Add(new() { Value = deliveryId });
            cmd.Parameters.Add(new() { Value = hook });
            Assert.Equal(1, await cmd.ExecuteNonQueryAsync(Ct));
        }
        var got = (await receiver.WaitForAsync(r => r.Delivery == deliveryId.ToString(), 1, Wait)).Single();
        Assert.Equal(2, got.Attempt);
        Assert.True(got.SignatureValid);
        Assert.Equal("delivered", (await DeliveriesWhenSettledAsync(client, hook, 1))[0].GetProperty("status").GetString());
    }
}

/// <summary>Webhook URLs under the default settings: https only, nothing private, checked again on every connection.</summary>
public sealed class WebhookUrlPolicyTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Private_loopback_and_insecure_urls_are_refused_unless_configured()
    {
        var client = await api.ClientAsync("hooks-policy", Roles.Member);
        foreach (var url in new[]
        {
            "http://hooks.example.com/x", "https://127.0.0.1/x", "https://localhost:8443/x", "https://10.0.0.8/x", "https://192.168.1.4/x",
            "https://172.20.0.1/x", "https://169.254.169.254/latest/meta-data", "https://[::1]/x", "https://[fd00::1]/x", "https://user:pw@hooks.example.com/x",
            "ftp://hooks.example.com/x", "not a url",
        })
        {
            var r = await client.PostAsJsonAsync("/v1/webhooks", new { url }, Ct);
            Assert.True(r.StatusCode == HttpStatusCode.UnprocessableEntity, $"{url}: {(int)r.StatusCode}");
            Assert.True((await r.JsonAsync()).GetProperty("errors").TryGetProperty("url", out _), url);
        }
        var unknownEvent = await client.PostAsJsonAsync("/v1/webhooks", new { url = "https://hooks.example.com/x", events = new[] { "job.exploded" } }, Ct);
        Assert.True((await unknownEvent.JsonAsync()).GetProperty("errors").TryGetProperty("events[0]", out _));
        Assert.Equal(HttpStatusCode.Created, (await client.PostAsJsonAsync("/v1/webhooks", new { url = "https://hooks.example.com/x" }, Ct)).StatusCode);
    }

    [Fact]
    public async Task The_sender_refuses_a_host_name_that_resolves_to_a_private_address()
    {
        await using var receiver = new WebhookReceiver();
        using var strict = WebhookDeliveryService.CreateClient(new WebhookOptions { AllowInsecureHttp = true });
        var e = await Assert.ThrowsAsync<HttpRequestException>(() => strict.PostAsync($"http://localhost:{receiver.Port}/hook/", new StringContent("{}"), Ct));
        Assert.Contains("private", e.Message);
        Assert.Empty(receiver.Requests);
        using var open = WebhookDeliveryService.CreateClient(new WebhookOptions { AllowInsecureHttp = true, AllowPrivateAddresses = true });
        Assert.Equal(HttpStatusCode.NoContent, (await open.PostAsync(receiver.Url, new StringContent("{}"), Ct)).StatusCode);
    }

    [Fact]
    public void Address_classes_and_backoff()
    {
        foreach (var ip in new[] { "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1" })
            Assert.True(OutboundUrlPolicy.IsPublic(IPAddress.Parse(ip)), ip);
        foreach (var ip in new[] { "0.0.0.0", "10.1.2.3", "100.64.0.1", "127.0.0.2", "169.254.1.1", "172.16.0.1", "172.31.255.255", "192.168.0.1",
                     "192.0.2.1", "198.18.0.1", "224.0.0.1", "255.255.255.255", "::", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1", "2001:db8::1" })
            Assert.False(OutboundUrlPolicy.IsPublic(IPAddress.Parse(ip)), ip);
        var o = new WebhookOptions { RetryBaseDelay = TimeSpan.FromSeconds(10), RetryMaxDelay = TimeSpan.FromMinutes(5) };
        Assert.Equal(10, o.Backoff(1, 0.5).TotalSeconds, 6);
        Assert.Equal(20, o.Backoff(2, 0.5).TotalSeconds, 6);
        Assert.Equal(80, o.Backoff(4, 0.5).TotalSeconds, 6);
        Assert.Equal(300, o.Backoff(20, 0.5).TotalSeconds, 6);
        Assert.InRange(o.Backoff(1, 0).TotalSeconds, 7.99, 8.01);
        Assert.InRange(o.Backoff(1, 1).TotalSeconds, 11.99, 12.01);
    }
}
