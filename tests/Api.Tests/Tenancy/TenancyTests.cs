using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using FineTune.Domain.Tenants;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests.Tenancy;

/// <summary>Tenants, keys and roles over HTTP; the audit log; quotas refused at submit with their usage; queue positions.</summary>
public sealed class TenancyTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task<JsonElement> Ok(HttpResponseMessage r)
    {
        var body = await r.Content.ReadAsStringAsync(Ct);
        Assert.True(r.IsSuccessStatusCode, $"{r.RequestMessage?.Method} {r.RequestMessage?.RequestUri} → {(int)r.StatusCode}: {body}");
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    private HttpClient WithKey(string key)
    {
        var c = api.CreateClient();
        c.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return c;
    }

    [Fact]
    public async Task Admin_creates_tenants_and_keys_shown_once_stored_hashed_listed_by_prefix_and_revoked_at_once()
    {
        var admin = await api.ClientAsync("operators");
        var tenant = await Ok(await admin.PostAsJsonAsync("/v1/tenants", new { name = "team-vision", quotas = new { maxRunningJobs = 2 } }, Ct));
        var tenantId = tenant.GetProperty("id").GetGuid();
        Assert.Equal(2, tenant.GetProperty("quotas").GetProperty("maxRunningJobs").GetInt32());
        Assert.Equal(HttpStatusCode.Conflict, (await admin.PostAsJsonAsync("/v1/tenants", new { name = "team-vision" }, Ct)).StatusCode);
        var badName = await admin.PostAsJsonAsync("/v1/tenants", new { name = "Team Vision", quotas = new { maxQueuedJobs = -1 } }, Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, badName.StatusCode);
        var errors = (await badName.JsonAsync()).GetProperty("errors");
        Assert.True(errors.TryGetProperty("name", out _));
        Assert.True(errors.TryGetProperty("quotas.maxQueuedJobs", out _));
        var unknownField = await admin.PostAsJsonAsync("/v1/tenants", new { name = "x", colour = "red" }, Ct);
        Assert.Equal(HttpStatusCode.BadRequest, unknownField.StatusCode);
        Assert.True((await unknownField.JsonAsync()).GetProperty("errors").TryGetProperty("colour", out _));
        var noName = await admin.PostAsJsonAsync("/v1/tenants", new { quotas = new { maxRunningJobs = 1 } }, Ct);
        Assert.Equal(HttpStatusCode.BadRequest, noName.StatusCode);
        Assert.Equal(["is required"], (await noName.JsonAsync()).GetProperty("errors").GetProperty("name").EnumerateArray().Select(x => x.GetString()));
        var wrongType = await admin.PostAsJsonAsync("/v1/tenants", new { name = "typed", quotas = new { maxRunningJobs = "two" } }, Ct);
        Assert.True((await wrongType.JsonAsync()).GetProperty("errors").TryGetProperty("quotas.maxRunningJobs", out _));

        var created = await Ok(await admin.PostAsJsonAsync($"/v1/tenants/{tenantId}/keys", new { role = "member", name = "ci" }, Ct));
        var key = created.GetProperty("key").GetString()!;
        Assert.True(ApiKeys.LooksValid(key));
        Assert.Equal(key[..ApiKeys.PrefixLength], created.GetProperty("prefix").GetString());
        await using (var db = api.Db())
        {
            var stored = await db.ApiKeys.SingleAsync(k => k.Id == created.GetProperty("id").GetGuid(), Ct);
            Assert.Equal(ApiKeys.Hash(key), stored.Hash);
            Assert.DoesNotContain(key, stored.Hash + stored.Prefix + stored.Name);
        }
        var keys = await Ok(await admin.GetAsync($"/v1/tenants/{tenantId}/keys", Ct));
        Assert.DoesNotContain(key, keys.GetRawText());
        Assert.False(keys[0].TryGetProperty("key", out _));
        Assert.Equal(HttpStatusCode.UnprocessableEntity,
            (await admin.PostAsJsonAsync($"/v1/tenants/{tenantId}/keys", new { role = "owner", expiresAt = DateTimeOffset.UtcNow.AddDays(-1) }, Ct)).StatusCode);

        // The key works for its own tenant…
        var member = WithKey(key);
        var me = await Ok(await member.GetAsync("/v1/me", Ct));
        Assert.Equal("team-vision", me.GetProperty("tenant").GetProperty("name").GetString());
        Assert.Equal("member", me.GetProperty("key").GetProperty("role").GetString());
        Assert.Equal(0, me.GetProperty("tenant").GetProperty("usage").GetProperty("queuedJobs").GetInt32());
        // …but a member is not an operator…
        Assert.Equal(HttpStatusCode.Forbidden, (await member.GetAsync("/v1/tenants", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await member.GetAsync("/v1/audit", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await member.PostAsJsonAsync($"/v1/tenants/{tenantId}/keys", new { role = "admin" }, Ct)).StatusCode);
        // …and once revoked it is refused on the very next request.
        await Ok(await admin.DeleteAsync($"/v1/tenants/{tenantId}/keys/{created.GetProperty("id").GetGuid()}", Ct));
        var after = await member.GetAsync("/v1/me", Ct);
        Assert.Equal(HttpStatusCode.Unauthorized, after.StatusCode);
        Assert.Contains("revoked", (await after.JsonAsync()).GetProperty("detail").GetString());

        var audit = await Ok(await admin.GetAsync($"/v1/audit?tenantId={tenantId}", Ct));
        Assert.Equal(["key.revoked", "key.created", "tenant.created"],
            audit.GetProperty("data").EnumerateArray().Select(e => e.GetProperty("action").GetString()));
    }

    [Fact]
    public async Task Readers_read_members_write_and_every_change_is_in_the_audit_log()
    {
        var member = await api.ClientAsync("roles", Roles.Member);
        var reader = await api.ClientAsync("roles", Roles.Reader);
        var submit = await member.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);
        Assert.Equal(HttpStatusCode.Accepted, submit.StatusCode);
        var jobId = (await submit.JsonAsync()).GetProperty("id").GetGuid();

        Assert.Equal(HttpStatusCode.OK, (await reader.GetAsync($"/v1/fine-tunes/{jobId}", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await reader.GetAsync("/v1/me", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await reader.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await reader.PostAsync($"/v1/fine-tunes/{jobId}/cancel", null, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.Forbidden, (await reader.PostAsJsonAsync("/v1/webhooks", new { url = "https://hooks.example.com/x" }, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await member.PostAsync($"/v1/fine-tunes/{jobId}/cancel", null, Ct)).StatusCode);

        var admin = await api.ClientAsync("roles-operator");
        var events = (await Ok(await admin.GetAsync($"/v1/audit?tenantId={await api.TenantIdAsync("roles")}", Ct))).GetProperty("data");
        Assert.Equal(["job.cancelled", "job.created"], events.EnumerateArray().Select(e => e.GetProperty("action").GetString()));
        Assert.All(events.EnumerateArray(), e =>
        {
            Assert.Equal(jobId.ToString(), e.GetProperty("targetId").GetString());
            Assert.Equal("member", e.GetProperty("actorRole").GetString());
        });
        var byTarget = await Ok(await admin.GetAsync($"/v1/audit?targetId={jobId}&action=job.created&limit=1", Ct));
        Assert.Single(byTarget.GetProperty("data").EnumerateArray());
    }

    [Fact]
    public async Task Submits_over_the_queue_or_rate_quota_are_429_with_usage_and_admitted_once_a_slot_frees()
    {
        var admin = await api.ClientAsync("quota-admin");
        var client = await api.ClientAsync("quota-queue", Roles.Member);
        var tenantId = await api.TenantIdAsync("quota-queue");
        await Ok(await admin.PutAsJsonAsync($"/v1/tenants/{tenantId}/quotas", new { maxQueuedJobs = 2 }, Ct));

        var first = (await Ok(await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct))).GetProperty("id").GetGuid();
        await Ok(await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct));
        var refused = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);
        Assert.Equal(HttpStatusCode.TooManyRequests, refused.StatusCode);
        var problem = await refused.JsonAsync();
        Assert.Equal("maxQueuedJobs", problem.GetProperty("quota").GetProperty("limit").GetString());
        Assert.Equal(2, problem.GetProperty("quota").GetProperty("max").GetInt32());
        Assert.Equal(2, problem.GetProperty("quota").GetProperty("current").GetInt32());
        Assert.Equal(2, problem.GetProperty("usage").GetProperty("queuedJobs").GetInt32());
        Assert.Equal(2, (await Ok(await client.GetAsync("/v1/fine-tunes", Ct))).GetProperty("data").GetArrayLength());

        // A queued slot frees (here: a cancel): the same job is admitted.
        await Ok(await client.PostAsync($"/v1/fine-tunes/{first}/cancel", null, Ct));
        Assert.Equal(HttpStatusCode.Accepted, (await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).StatusCode);

        var rated = await api.ClientAsync("quota-rate", Roles.Member);
        await Ok(await admin.PutAsJsonAsync($"/v1/tenants/{await api.TenantIdAsync("quota-rate")}/quotas", new { maxSubmissionsPerMinute = 2 }, Ct));
        for (var i = 0; i < 2; i++) await Ok(await rated.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct));
        var limited = await rated.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);
        Assert.Equal(HttpStatusCode.TooManyRequests, limited.StatusCode);
        Assert.Equal("maxSubmissionsPerMinute", (await limited.JsonAsync()).GetProperty("quota").GetProperty("limit").GetString());
        Assert.InRange(int.Parse(limited.Headers.GetValues("Retry-After").Single()), 1, 60);
    }

    [Fact]
    public async Task A_job_too_large_for_the_tenant_is_422_naming_the_field_the_limit_and_its_size()
    {
        var admin = await api.ClientAsync("quota-admin");
        var client = await api.ClientAsync("quota-size", Roles.Member);
        var tenantId = await api.TenantIdAsync("quota-size");
        // A tokenizer beside the test model's config, so that the token quota can count.
        Domain.Tokenizers.TinyTokenizer.WriteFiles(Path.Combine(api.ModelsRoot, "tiny"));

        async Task<JsonElement> Refused(object quotas, string body, string field, string limit)
        {
            await Ok(await admin.PutAsJsonAsync($"/v1/tenants/{tenantId}/quotas", quotas, Ct));
            var r = await client.PostAsync("/v1/fine-tunes", Requests.Body(body), Ct);
            var problem = await r.JsonAsync();
            Assert.True(r.StatusCode == HttpStatusCode.UnprocessableEntity, $"{limit}: {(int)r.StatusCode} {problem}");
            Assert.True(problem.GetProperty("errors").TryGetProperty(field, out _), problem.ToString());
            Assert.Equal(limit, problem.GetProperty("quota").GetProperty("limit").GetString());
            return problem;
        }
        await Refused(new { allowedPools = new[] { "cpu" } }, Requests.LoraWith(n => n["pool"] = "gpu-a100"), "pool", "allowedPools");
        await Refused(new { maxPriority = "normal" }, Requests.LoraWith(n => n["priority"] = "high"), "priority", "maxPriority");
        var bytes = await Refused(new { maxDatasetBytes = 10 }, Requests.Lora, "trainingData", "maxDatasetBytes");
        Assert.Equal(new FileInfo(Path.Combine(api.DataRoot, "train.jsonl")).Length, bytes.GetProperty("quota").GetProperty("actual").GetInt64());
        // 2 examples, batch 2: one step per epoch.
        var steps = await Refused(new { maxStepsPerJob = 2 }, Requests.LoraWith(n => n["hyperparameters"]!["epochs"] = 3), "hyperparameters.epochs", "maxStepsPerJob");
        Assert.Equal(3, steps.GetProperty("quota").GetProperty("actual").GetInt64());
        await Refused(new { maxStepsPerJob = 5 }, Requests.LoraWith(n => n["hyperparameters"]!["maxSteps"] = 6), "hyperparameters.maxSteps", "maxStepsPerJob");
        await Refused(new { maxTokensPerJob = 5 }, Requests.Lora, "trainingData", "maxTokensPerJob");

        // Within every limit it is accepted.
        await Ok(await admin.PutAsJsonAsync($"/v1/tenants/{tenantId}/quotas", new
        {
            allowedPools = new[] { "cpu" }, maxPriority = "normal", maxDatasetBytes = 10_000, maxStepsPerJob = 2, maxTokensPerJob = 10_000,
        }, Ct));
        Assert.Equal(HttpStatusCode.Accepted, (await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.UnprocessableEntity,
            (await admin.PutAsJsonAsync($"/v1/tenants/{tenantId}/quotas", new { allowedPools = new[] { "tpu" } }, Ct)).StatusCode);
    }

    [Fact]
    public async Task Queued_jobs_show_their_fair_share_position_estimated_start_and_running_quota_wait()
    {
        var a = await api.ClientAsync("queue-a", Roles.Member);
        var b = await api.ClientAsync("queue-b", Roles.Member);
        var onGpu = Requests.LoraWith(n => n["pool"] = "gpu-a100");
        async Task<Guid> Submit(HttpClient c, string body) => (await Ok(await c.PostAsync("/v1/fine-tunes", Requests.Body(body), Ct))).GetProperty("id").GetGuid();
        var a1 = await Submit(a, onGpu);
        var a2 = await Submit(a, onGpu);
        var a3 = await Submit(a, onGpu);
        var b1 = await Submit(b, onGpu);
        async Task<JsonElement> Queue(HttpClient c, Guid id) => (await Ok(await c.GetAsync($"/v1/fine-tunes/{id}", Ct))).GetProperty("queue");

        // Tenants take turns: B's first job is second, ahead of A's later ones. No finished job yet: no estimate.
        var positions = new List<int>();
        foreach (var (c, id) in new[] { (a, a1), (b, b1), (a, a2), (a, a3) }) positions.Add((await Queue(c, id)).GetProperty("position").GetInt32());
        Assert.Equal([1, 2, 3, 4], positions);
        Assert.Equal(JsonValueKind.Null, (await Queue(a, a1)).GetProperty("estimatedStartAt").ValueKind);
        // A high-priority job goes first.
        var urgent = await Submit(b, Requests.LoraWith(n => { n["pool"] = "gpu-a100"; n["priority"] = "high"; }));
        Assert.Equal(1, (await Queue(b, urgent)).GetProperty("position").GetInt32());
        Assert.Equal(2, (await Queue(a, a1)).GetProperty("position").GetInt32());

        // With a finished job to measure (60 s long), estimates appear and grow down the queue.
        await using (var db = api.Db())
        {
            var done = await db.Jobs.SingleAsync(j => j.Id == a3, Ct);
            var t0 = DateTimeOffset.UtcNow.AddMinutes(-5);
            done.Claim("node-test", t0);
            done.Succeed(Guid.NewGuid(), t0.AddSeconds(60));
            await db.SaveChangesAsync(Ct);
        }
        var queue = new List<(int Position, DateTimeOffset Start)>();
        foreach (var (c, id) in new[] { (b, urgent), (a, a1), (b, b1), (a, a2) })
        {
            var q = await Queue(c, id);
            queue.Add((q.GetProperty("position").GetInt32(), q.GetProperty("estimatedStartAt").GetDateTimeOffset()));
        }
        Assert.Equal([1, 2, 3, 4], queue.Select(q => q.Position));
        var starts = queue.Select(q => q.Start).ToList();
        Assert.Equal(starts.Order(), starts);
        Assert.InRange((starts[^1] - starts[0]).TotalSeconds, 179, 181);
        Assert.Equal("slot", (await Queue(a, a1)).GetProperty("waitingFor").GetString());

        // A tenant whose running quota is full waits for it, not for a slot; a listed job carries its queue too.
        var admin = await api.ClientAsync("quota-admin");
        await Ok(await admin.PutAsJsonAsync($"/v1/tenants/{await api.TenantIdAsync("queue-a")}/quotas", new { maxRunningJobs = 0 }, Ct));
        Assert.Equal("maxRunningJobs", (await Queue(a, a1)).GetProperty("waitingFor").GetString());
        var listed = await Ok(await a.GetAsync("/v1/fine-tunes?status=queued", Ct));
        Assert.All(listed.GetProperty("data").EnumerateArray(), j => Assert.Equal(JsonValueKind.Object, j.GetProperty("queue").ValueKind));
    }
}
