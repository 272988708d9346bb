using System.IO.Compression;
using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;
using FineTune.Tests.Shared;

namespace FineTune.EndToEnd.Tests;

/// <summary>Two tenants on real workers: how the dispatcher orders their jobs, what the registry records, what webhooks say.</summary>
public static class Tenancy
{
    public static readonly Dictionary<string, string> Settings = new()
    {
        ["Webhooks:AllowPrivateAddresses"] = "true",
        ["Webhooks:AllowInsecureHttp"] = "true",
        ["Webhooks:PollInterval"] = "00:00:00.100",
        ["Webhooks:RetryBaseDelay"] = "00:00:00.200",
    };

    /// <summary>A tenant (created by the fixture's admin key) and a member key of it.</summary>
    public static async Task<HttpClient> TenantAsync(ServiceFixture s, string name, object? quotas = null)
    {
        var tenant = await Json(await s.Client.PostAsJsonAsync("/v1/tenants", new { name, quotas }));
        var key = await Json(await s.Client.PostAsJsonAsync($"/v1/tenants/{tenant["id"]}/keys", new { role = "member", name = "e2e" }));
        return s.ClientFor(key["key"]!.GetValue<string>());
    }

    public static async Task<JsonObject> Json(HttpResponseMessage r)
    {
        var text = await r.Content.ReadAsStringAsync();
        Assert.True(r.IsSuccessStatusCode, $"{r.RequestMessage?.Method} {r.RequestMessage?.RequestUri} → {(int)r.StatusCode}: {text}");
        return JsonNode.Parse(text) as JsonObject ?? new JsonObject { ["items"] = JsonNode.Parse(text) };
    }

    /// <summary>A tiny job: LoRA, or Bone (whose folder also holds the lora/ export).</summary>
    public static object Job(ServiceFixture s, string task, int steps, string priority = "normal", bool bone = false) => new
    {
        model = "file://" + s.ModelDir,
        trainingData = "file://" + s.DatasetPath,
        method = bone ? new { type = "bone", r = 16, targetModules = new[] { "q_proj", "v_proj" } }
            : (object)new { type = "lora", r = 2, alpha = 4, targetModules = new[] { "q_proj", "v_proj" } },
        hyperparameters = new { maxSteps = steps, batchSize = 2, learningRate = 3e-3, maxSeqLength = 32, seed = 11 },
        adapterName = task,
        pool = "cpu",
        priority,
    };

    public static async Task<string> SubmitAsync(HttpClient c, object body) => (await Json(await c.PostAsJsonAsync("/v1/fine-tunes", body)))["id"]!.GetValue<string>();

    /// <summary>The id of the job's first event of <paramref name="type"/>: event ids are one sequence, so they order
    /// events across jobs by when they were written.</summary>
    public static async Task<long> EventIdAsync(HttpClient c, string job, string type)
    {
        var events = JsonNode.Parse(await c.GetStringAsync($"/v1/fine-tunes/{job}/events"))!.AsArray();
        return events.First(e => e!["type"]!.GetValue<string>() == type)!["id"]!.GetValue<long>();
    }

    public static Task<JsonObject> WaitFinishedAsync(ServiceFixture s, HttpClient c, string id, TimeSpan timeout) =>
        WaitUntilAsync(c, id, ServiceFixture.Finished, timeout);

    public static async Task<JsonObject> WaitUntilAsync(HttpClient c, string id, Func<JsonObject, bool> done, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var job = JsonNode.Parse(await c.GetStringAsync($"/v1/fine-tunes/{id}"))!.AsObject();
            if (done(job)) return job;
            Assert.True(DateTime.UtcNow < deadline, $"job {id} did not finish: {job.ToJsonString()}\n{await c.GetStringAsync($"/v1/fine-tunes/{id}/events")}");
            await Task.Delay(200);
        }
    }

    public static string Sha256(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));
}

public sealed class FairDispatchTests : IAsyncLifetime
{
    private readonly ServiceFixture _s = new(Tenancy.Settings);
    public ValueTask InitializeAsync() => _s.InitializeAsync();
    public ValueTask DisposeAsync() => _s.DisposeAsync();

    [Fact]
    public async Task High_priority_goes_first_tenant_B_starts_before_A_s_tenth_job_and_versions_carry_their_lineage()
    {
        var a = await Tenancy.TenantAsync(_s, "team-a");
        var b = await Tenancy.TenantAsync(_s, "team-b");
        // Everything is queued before a worker exists, so the order below is the dispatcher's choice alone.
        var normals = new List<string>();
        for (var i = 0; i < 10; i++) normals.Add(await Tenancy.SubmitAsync(a, Tenancy.Job(_s, "fair-a", steps: 1)));
        var high = await Tenancy.SubmitAsync(a, Tenancy.Job(_s, "fair-a-urgent", steps: 1, priority: "high"));
        var bFirst = await Tenancy.SubmitAsync(b, Tenancy.Job(_s, "fair-b", steps: 2, bone: true));
        var queued = JsonNode.Parse(await b.GetStringAsync($"/v1/fine-tunes/{bFirst}"))!;
        Assert.Equal(2, queued["queue"]!["position"]!.GetValue<int>()); // right after A's high-priority job

        await _s.StartWorkerAsync(new Dictionary<string, string> { ["Worker:Slots"] = "1" });
        var all = normals.Append(high).Select(id => (Client: a, Id: id)).Append((Client: b, Id: bFirst)).ToList();
        foreach (var (client, id) in all)
            Assert.Equal("succeeded", ServiceFixture.Status(await Tenancy.WaitFinishedAsync(_s, client, id, TimeSpan.FromMinutes(3))));

        var starts = new List<(string Id, long Event)>();
        foreach (var (client, id) in all) starts.Add((id, await Tenancy.EventIdAsync(client, id, "running")));
        var order = starts.OrderBy(x => x.Event).Select(x => x.Id).ToList();
        Assert.Equal(high, order[0]);                                    // high before A's ten earlier normal jobs
        Assert.True(order.IndexOf(bFirst) < order.IndexOf(normals[9]), $"B started at {order.IndexOf(bFirst)}");
        Assert.Equal(1, order.IndexOf(bFirst));                          // round robin: B's turn comes right after A's first
        Assert.Equal(normals, order.Where(normals.Contains));            // a tenant's equal jobs keep their order

        // Registry: the ten fair-a jobs made v1..v10 in the order they ran.
        var task = await Tenancy.Json(await a.GetAsync("/v1/adapters/tasks/fair-a"));
        var versions = task["versions"]!.AsArray().Select(v => (Version: v!["version"]!.GetValue<int>(), Job: v["jobId"]!.GetValue<string>()))
            .OrderBy(v => v.Version).ToList();
        Assert.Equal(Enumerable.Range(1, 10), versions.Select(v => v.Version));
        Assert.Equal(normals, versions.Select(v => v.Job));

        // Lineage of B's version, checked against the files themselves.
        var adapter = await Tenancy.Json(await b.GetAsync("/v1/adapters/fair-b@v1"));
        var lineage = adapter["lineage"]!;
        Assert.Equal(bFirst, lineage["jobId"]!.GetValue<string>());
        Assert.Equal(Tenancy.Sha256(await File.ReadAllBytesAsync(_s.DatasetPath)), lineage["dataset"]!["sha256"]!.GetValue<string>());
        Assert.Equal("file://" + _s.DatasetPath, lineage["dataset"]!["uri"]!.GetValue<string>());
        var modelLines = Directory.GetFiles(_s.ModelDir).Select(Path.GetFileName)
            .Where(n => n!.EndsWith(".safetensors", StringComparison.Ordinal) || n is "config.json" or "model.safetensors.index.json")
            .Order(StringComparer.Ordinal).Select(n => $"{n} {Tenancy.Sha256(File.ReadAllBytes(Path.Combine(_s.ModelDir, n!)))}\n");
        Assert.Equal(Tenancy.Sha256(Encoding.UTF8.GetBytes(string.Concat(modelLines))), lineage["baseModel"]!["sha256"]!.GetValue<string>());
        Assert.Equal("bone", lineage["method"]!["type"]!.GetValue<string>());
        Assert.Equal(16, lineage["method"]!["r"]!.GetValue<int>());
        Assert.Equal(2, lineage["hyperparameters"]!["maxSteps"]!.GetValue<int>());
        Assert.Equal(2, lineage["metrics"]!["steps"]!.GetValue<long>());
        Assert.True(lineage["metrics"]!["finalLoss"]!.GetValue<double>() > 0);

        // Every file, downloaded one by one and zipped, matches the sha256 the registry lists.
        var files = adapter["files"]!.AsArray();
        Assert.Contains(files, f => f!["path"]!.GetValue<string>() == "lora/adapter_model.safetensors");
        Assert.Equal(files.Sum(f => f!["size"]!.GetValue<long>()), adapter["sizeBytes"]!.GetValue<long>());
        foreach (var f in files)
        {
            var bytes = await b.GetByteArrayAsync($"/v1/adapters/fair-b@v1/files/{f!["path"]}");
            Assert.Equal(f["sha256"]!.GetValue<string>(), Tenancy.Sha256(bytes));
        }
        using var zip = new ZipArchive(await b.GetStreamAsync($"/v1/adapters/{adapter["id"]}/download?part=lora"));
        foreach (var entry in zip.Entries)
        {
            await using var stream = entry.Open();
            using var copy = new MemoryStream();
            await stream.CopyToAsync(copy);
            Assert.Equal(files.Single(f => f!["path"]!.GetValue<string>() == "lora/" + entry.FullName)!["sha256"]!.GetValue<string>(), Tenancy.Sha256(copy.ToArray()));
        }
        Assert.Equal(HttpStatusCode.NotFound, (await a.GetAsync("/v1/adapters/fair-b@v1")).StatusCode);
    }
}

public sealed class QuotaDispatchTests : IAsyncLifetime
{
    private readonly ServiceFixture _s = new(Tenancy.Settings);
    public ValueTask InitializeAsync() => _s.InitializeAsync();
    public ValueTask DisposeAsync() => _s.DisposeAsync();

    [Fact]
    public async Task A_job_over_the_running_quota_waits_for_the_tenants_slot_not_for_a_worker_and_webhooks_report_it_signed()
    {
        await using var receiver = new WebhookReceiver();
        var q = await Tenancy.TenantAsync(_s, "team-quota", new { maxRunningJobs = 1, maxQueuedJobs = 1 });
        var free = await Tenancy.TenantAsync(_s, "team-free");
        var hook = await Tenancy.Json(await q.PostAsJsonAsync("/v1/webhooks", new { url = receiver.Url, events = new[] { "job.succeeded", "alias.moved" } }));
        receiver.Secret = hook["secret"]!.GetValue<string>();

        var first = await Tenancy.SubmitAsync(q, Tenancy.Job(_s, "quota-task", steps: 40));
        var refused = await q.PostAsJsonAsync("/v1/fine-tunes", Tenancy.Job(_s, "quota-task", steps: 1));
        Assert.Equal(HttpStatusCode.TooManyRequests, refused.StatusCode); // one queued already
        Assert.Equal("maxQueuedJobs", JsonNode.Parse(await refused.Content.ReadAsStringAsync())!["quota"]!["limit"]!.GetValue<string>());

        await _s.StartWorkerAsync(new Dictionary<string, string> { ["Worker:Slots"] = "2" });
        await Tenancy.WaitUntilAsync(q, first, j => ServiceFixture.Status(j) != "queued", TimeSpan.FromMinutes(2));
        // Queued slot free again: admitted, and it waits although the node has a free slot.
        var second = await Tenancy.SubmitAsync(q, Tenancy.Job(_s, "quota-task", steps: 1));
        var secondNow = JsonNode.Parse(await q.GetStringAsync($"/v1/fine-tunes/{second}"))!;
        var firstNow = JsonNode.Parse(await q.GetStringAsync($"/v1/fine-tunes/{first}"))!;
        if (ServiceFixture.Status(firstNow.AsObject()) == "running")
        {
            Assert.Equal("queued", ServiceFixture.Status(secondNow.AsObject()));
            Assert.Equal("maxRunningJobs", secondNow["queue"]!["waitingFor"]!.GetValue<string>());
        }
        foreach (var id in new[] { first, second })
            Assert.Equal("succeeded", ServiceFixture.Status(await Tenancy.WaitFinishedAsync(_s, q, id, TimeSpan.FromMinutes(3))));
        Assert.True(await Tenancy.EventIdAsync(q, second, "running") > await Tenancy.EventIdAsync(q, first, "succeeded"),
            "the second job started before the first ended");

        // Without the quota the same node runs two jobs of a tenant at once.
        var f1 = await Tenancy.SubmitAsync(free, Tenancy.Job(_s, "free-task", steps: 40));
        var f2 = await Tenancy.SubmitAsync(free, Tenancy.Job(_s, "free-task", steps: 40));
        foreach (var id in new[] { f1, f2 }) await Tenancy.WaitFinishedAsync(_s, free, id, TimeSpan.FromMinutes(3));
        var overlap = Math.Max(await Tenancy.EventIdAsync(free, f1, "running"), await Tenancy.EventIdAsync(free, f2, "running"))
            < Math.Min(await Tenancy.EventIdAsync(free, f1, "succeeded"), await Tenancy.EventIdAsync(free, f2, "succeeded"));
        Assert.True(overlap, "two slots, no quota: both jobs should have been running together");

        // Webhooks: one signed job.succeeded per job, naming its version; alias moves too.
        var succeeded = await receiver.WaitForAsync(r => r.Event == "job.succeeded", 2, TimeSpan.FromSeconds(30));
        Assert.All(succeeded, r => Assert.True(r.SignatureValid, r.Signature));
        var versions = succeeded.Select(r => JsonNode.Parse(r.Body)!["data"]!)
            .ToDictionary(d => d["jobId"]!.GetValue<string>(), d => d["adapterVersion"]!.GetValue<int>());
        Assert.Equal(1, versions[first]);
        Assert.Equal(2, versions[second]);
        await Tenancy.Json(await q.PutAsJsonAsync("/v1/adapters/tasks/quota-task/aliases/production", new { version = 1 }));
        await Tenancy.Json(await q.PutAsJsonAsync("/v1/adapters/tasks/quota-task/aliases/production", new { version = 2 }));
        var moves = await receiver.WaitForAsync(r => r.Event == "alias.moved", 2, TimeSpan.FromSeconds(30));
        var last = moves.Select(m => JsonNode.Parse(m.Body)!["data"]!).Single(d => d["version"]!.GetValue<int>() == 2);
        Assert.Equal(1, last["previousVersion"]!.GetValue<int>());
        Assert.All(moves, r => Assert.True(r.SignatureValid));
        Assert.DoesNotContain(receiver.Requests, r => r.Body.Contains(f1) || r.Body.Contains(f2)); // the other tenant's events are not ours

        // Versions are never reused: v1 deleted and purged, the next job makes v3.
        var v1 = await Tenancy.Json(await q.GetAsync("/v1/adapters/quota-task@v1"));
        await Tenancy.Json(await q.DeleteAsync($"/v1/adapters/{v1["id"]}"));
        await Tenancy.Json(await q.PostAsync($"/v1/adapters/{v1["id"]}/purge", null));
        var third = await Tenancy.SubmitAsync(q, Tenancy.Job(_s, "quota-task", steps: 1));
        var done = await Tenancy.WaitFinishedAsync(_s, q, third, TimeSpan.FromMinutes(2));
        var v3 = await Tenancy.Json(await q.GetAsync($"/v1/adapters/{done["adapterId"]}"));
        Assert.Equal(3, v3["version"]!.GetValue<int>());
    }
}
