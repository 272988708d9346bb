using System.Net;
using System.Text.Json;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests;

public sealed class SubmitTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Lora_job_is_accepted_stored_evented_and_enqueued()
    {
        var client = await api.ClientAsync("submit-lora");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);

        Assert.Equal(HttpStatusCode.Accepted, response.StatusCode);
        var job = await response.JsonAsync();
        var id = job.GetProperty("id").GetGuid();
        Assert.Equal($"/v1/fine-tunes/{id}", response.Headers.Location?.OriginalString);
        Assert.Equal("queued", job.GetProperty("status").GetString());
        Assert.Equal("lora", job.GetProperty("method").GetProperty("type").GetString());
        Assert.Equal(8, job.GetProperty("method").GetProperty("r").GetInt32());
        Assert.Equal(2, job.GetProperty("hyperparameters").GetProperty("batchSize").GetInt32());
        Assert.Equal("cpu", job.GetProperty("pool").GetString());
        Assert.Equal("normal", job.GetProperty("priority").GetString());
        Assert.Equal(0, job.GetProperty("progress").GetProperty("step").GetInt32());
        Assert.False(job.GetProperty("cancelRequested").GetBoolean());

        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.Equal(JobStatus.Queued, row.Status);
        var lora = Assert.IsType<LoraMethod>(row.Method);
        Assert.Equal(0.05, lora.Dropout);
        Assert.Equal(Path.Combine(api.ModelsRoot, "tiny"), row.ModelPath);
        Assert.Equal(await api.TenantIdAsync("submit-lora"), row.TenantId);
        var ev = await db.JobEvents.SingleAsync(e => e.JobId == id, Ct);
        Assert.Equal("queued", ev.Type);
        Assert.Contains(api.Dispatcher.Enqueued, e => e.JobId == id && e.Pool == "cpu" && e.Priority == 5);

        var get = await client.GetAsync($"/v1/fine-tunes/{id}", Ct);
        Assert.Equal(HttpStatusCode.OK, get.StatusCode);
        Assert.Equal(id, (await get.JsonAsync()).GetProperty("id").GetGuid());
    }

    [Fact]
    public async Task Bone_job_with_registered_model_pool_and_priority_is_accepted()
    {
        var client = await api.ClientAsync("submit-bone", "member");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Bone), Ct);

        Assert.Equal(HttpStatusCode.Accepted, response.StatusCode);
        var job = await response.JsonAsync();
        var id = job.GetProperty("id").GetGuid();
        Assert.Equal("bone", job.GetProperty("method").GetProperty("type").GetString());
        Assert.Equal("gpu-a100", job.GetProperty("pool").GetString());
        Assert.Equal("high", job.GetProperty("priority").GetString());
        Assert.Equal(4, job.GetProperty("hyperparameters").GetProperty("batchSize").GetInt32()); // default filled in
        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.Equal(16, Assert.IsType<BoneMethod>(row.Method).R);
        Assert.Equal(10, row.Priority);
        Assert.Contains(api.Dispatcher.Enqueued, e => e.JobId == id && e.Pool == "gpu-a100" && e.Priority == 10);
    }

    /// <summary>The method object replaced by <paramref name="json"/>; the rest is the lora request.</summary>
    private static string WithMethod(string json) => Requests.LoraWith(o => o["method"] = System.Text.Json.Nodes.JsonNode.Parse(json));

    public static TheoryData<string, Type> OtherMethods() => new()
    {
        { """{"type": "bone", "r": 16, "mode": "mini", "miniR": 32, "targetModules": ["q_proj", "k_proj", "down_proj"]}""", typeof(BoneMethod) },
        { """{"type": "bat", "r": 16, "grouping": "row", "targetModules": ["q_proj", "gate_proj", "down_proj"]}""", typeof(BatMethod) },
        { """{"type": "bat", "targetModules": ["v_proj"], "r": 32}""", typeof(BatMethod) },
        { """{"type": "sbora", "variant": "fb", "r": 32, "alpha": 64, "targetModules": ["k_proj", "v_proj"]}""", typeof(SboraMethod) },
    };

    [Theory]
    [MemberData(nameof(OtherMethods))]
    public async Task Bone_mini_bat_and_sbora_jobs_are_accepted_with_their_options(string method, Type options)
    {
        var client = await api.ClientAsync("submit-methods");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(WithMethod(method)), Ct);
        Assert.True(response.StatusCode == HttpStatusCode.Accepted, await response.Content.ReadAsStringAsync(Ct));
        var id = (await response.JsonAsync()).GetProperty("id").GetGuid();
        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.IsType(options, row.Method);
        var sent = System.Text.Json.Nodes.JsonNode.Parse(method)!.AsObject();
        var stored = System.Text.Json.JsonSerializer.SerializeToNode(row.Method, FineTune.Domain.DomainJson.Options)!.AsObject();
        foreach (var (key, value) in sent.Where(kv => kv.Key != "type"))
            Assert.True(System.Text.Json.Nodes.JsonNode.DeepEquals(value, stored[key]), $"{key}: sent {value}, stored {stored[key]}");
    }

    [Fact]
    public async Task Lora_family_options_and_merge_are_accepted_and_stored()
    {
        var client = await api.ClientAsync("submit-lora-family");
        var pissa = Requests.LoraWith(o =>
        {
            o["method"]!["init"] = "pissa";
            o["method"]!["loraPlusRatio"] = 16;
        });
        var dora = Requests.LoraWith(o =>
        {
            o["method"] = new System.Text.Json.Nodes.JsonObject
            {
                ["type"] = "dora", ["r"] = 4, ["init"] = "gaussian", ["targetModules"] = new System.Text.Json.Nodes.JsonArray("q_proj", "o_proj"),
            };
            o["merge"] = true;
        });
        var first = await client.PostAsync("/v1/fine-tunes", Requests.Body(pissa), Ct);
        Assert.Equal(HttpStatusCode.Accepted, first.StatusCode);
        var pissaJob = await first.JsonAsync();
        Assert.Equal("pissa", pissaJob.GetProperty("method").GetProperty("init").GetString());
        Assert.Equal(16, pissaJob.GetProperty("method").GetProperty("loraPlusRatio").GetDouble());
        Assert.False(pissaJob.GetProperty("merge").GetBoolean());

        var second = await client.PostAsync("/v1/fine-tunes", Requests.Body(dora), Ct);
        Assert.Equal(HttpStatusCode.Accepted, second.StatusCode);
        var doraJob = await second.JsonAsync();
        Assert.Equal("dora", doraJob.GetProperty("method").GetProperty("type").GetString());
        Assert.Equal(JsonValueKind.Null, doraJob.GetProperty("method").GetProperty("loraPlusRatio").ValueKind);
        Assert.True(doraJob.GetProperty("merge").GetBoolean());

        await using var db = api.Db();
        var tenant = await api.TenantIdAsync("submit-lora-family");
        var rows = await db.Jobs.Where(j => j.TenantId == tenant).ToListAsync(Ct);
        var pissaRow = rows.Single(r => r.Id == pissaJob.GetProperty("id").GetGuid());
        var lora = Assert.IsType<LoraMethod>(pissaRow.Method);
        Assert.Equal(("pissa", 16.0), (lora.Init, lora.LoraPlusRatio!.Value));
        Assert.False(pissaRow.Merge);
        var doraRow = rows.Single(r => r.Id == doraJob.GetProperty("id").GetGuid());
        Assert.True(doraRow.Merge);
        var doraMethod = Assert.IsType<DoraMethod>(doraRow.Method);
        Assert.Equal(("gaussian", 4), (doraMethod.Init, doraMethod.R));
    }

    public static TheoryData<string, string, int, string, string> BadInputs()
    {
        static string Edit(Action<System.Text.Json.Nodes.JsonObject> e) => Requests.LoraWith(e);
        return new()
        {
            { "bat r not dividing a module", WithMethod("""{"type": "bat", "r": 24, "targetModules": ["q_proj"]}"""), 422, "method.r", "module q_proj with shape (64, 64)" },
            { "bat r not dividing the mlp", WithMethod("""{"type": "bat", "r": 64, "grouping": "row", "targetModules": ["up_proj", "k_proj"]}"""), 422, "method.r", "module k_proj with shape (32, 64)" },
            { "bat unknown grouping", WithMethod("""{"type": "bat", "r": 16, "grouping": "diagonal"}"""), 422, "method.grouping", "col, row" },
            { "bone mini miniR not dividing", WithMethod("""{"type": "bone", "r": 8, "mode": "mini", "miniR": 24, "targetModules": ["k_proj"]}"""), 422, "method.miniR", "module k_proj with shape (32, 64)" },
            { "bone miniR without mini", WithMethod("""{"type": "bone", "r": 8, "miniR": 4}"""), 422, "method.miniR", "mode 'mini'" },
            { "bone unknown mode", WithMethod("""{"type": "bone", "r": 8, "mode": "maxi"}"""), 422, "method.mode", "default, mini" },
            { "sbora fb r above the output size", WithMethod("""{"type": "sbora", "variant": "fb", "r": 48, "targetModules": ["v_proj"]}"""), 422, "method.r", "module v_proj with shape (32, 64)" },
            { "sbora fa r above the input size", WithMethod("""{"type": "sbora", "r": 96, "targetModules": ["q_proj"]}"""), 422, "method.r", "module q_proj with shape (64, 64)" },
            { "sbora unknown variant", WithMethod("""{"type": "sbora", "variant": "fc"}"""), 422, "method.variant", "fa, fb" },
            { "sbora unknown field", WithMethod("""{"type": "sbora", "rank": 4}"""), 400, "method.rank", "unknown field" },
            { "unknown method type", Edit(o => o["method"]!["type"] = "qlora"), 400, "method.type", "unknown method type 'qlora'" },
            { "missing method type", Edit(o => o["method"]!.AsObject().Remove("type")), 400, "method.type", "is required" },
            { "unknown top-level field", Edit(o => o["learning_rate"] = 1), 400, "learning_rate", "unknown field" },
            { "unknown method field", Edit(o => o["method"]!["rank"] = 4), 400, "method.rank", "unknown field" },
            { "unknown hyperparameter", Edit(o => o["hyperparameters"]!["lr"] = 4), 400, "hyperparameters.lr", "unknown field" },
            { "wrong type", Edit(o => o["method"]!["r"] = "eight"), 400, "method.r", "must be an integer" },
            { "number as string", Edit(o => o["hyperparameters"]!["epochs"] = "2"), 400, "hyperparameters.epochs", "must be an integer" },
            { "missing model", Edit(o => o.Remove("model")), 400, "model", "is required" },
            { "null adapter name", Edit(o => o["adapterName"] = null), 400, "adapterName", "must not be null" },
            { "not JSON", "{\"model\": ", 400, "$", "is not valid JSON" },
            { "array body", "[1,2]", 400, "$", "JSON object" },
            { "r out of range", Edit(o => o["method"]!["r"] = 0), 422, "method.r", "between 1 and 4096" },
            { "dropout out of range", Edit(o => o["method"]!["dropout"] = 1.5), 422, "method.dropout", "[0, 1)" },
            { "unknown target module", Edit(o => o["method"]!["targetModules"] = new System.Text.Json.Nodes.JsonArray("qkv")), 422, "method.targetModules", "unknown module 'qkv'" },
            { "batch size out of range", Edit(o => o["hyperparameters"]!["batchSize"] = 0), 422, "hyperparameters.batchSize", "between 1 and 1024" },
            { "bad scheduler", Edit(o => o["hyperparameters"]!["scheduler"] = "step"), 422, "hyperparameters.scheduler", "constant, linear, cosine" },
            { "bad adapter dtype", Edit(o => o["hyperparameters"]!["adapterDtype"] = "fp8"), 422, "hyperparameters.adapterDtype", "auto, fp32, mixed, bf16" },
            { "r larger than a module", Edit(o => o["method"]!["r"] = 40), 422, "method.r", "module v_proj with shape (32, 64)" },
            { "bad adapter name", Edit(o => o["adapterName"] = "My Adapter!"), 422, "adapterName", "must match" },
            { "adapter name too long", Edit(o => o["adapterName"] = new string('a', 65)), 422, "adapterName", "must match" },
            { "unknown pool", Edit(o => o["pool"] = "tpu"), 422, "pool", "unknown pool 'tpu'" },
            { "unknown priority", Edit(o => o["priority"] = "urgent"), 422, "priority", "low, normal, high" },
            { "missing model folder", Edit(o => o["model"] = "nope"), 422, "model", "not found" },
            { "model outside roots", Edit(o => o["model"] = "file:///etc"), 422, "model", "outside the allowed storage roots" },
            { "dataset outside roots", Edit(o => o["trainingData"] = "file:///etc/passwd"), 422, "trainingData", "outside the allowed dataset locations" },
            { "dataset escaping with ..", Edit(o => o["trainingData"] = "../../../../etc/passwd"), 422, "trainingData", "outside the allowed dataset locations" },
            { "missing dataset", Edit(o => o["trainingData"] = "nope.jsonl"), 422, "trainingData", "was not found" },
            { "plain http dataset", Edit(o => o["trainingData"] = "http://example.com/x.jsonl"), 422, "trainingData", "plain http:// is not accepted" },
            { "other scheme dataset", Edit(o => o["trainingData"] = "s3://bucket/x.jsonl"), 422, "trainingData", "unsupported dataset URI scheme \"s3\"" },
            { "missing validation dataset", Edit(o => o["validationData"] = "nope.jsonl"), 422, "validationData", "was not found" },
            { "unknown lora init", Edit(o => o["method"]!["init"] = "kaiming"), 422, "method.init", "must be one of: default, gaussian, pissa, olora" },
            { "null lora init", Edit(o => o["method"]!["init"] = null), 400, "method.init", "must not be null" },
            { "bf16 adapters on dora", Edit(o => { o["method"]!["type"] = "dora"; o["hyperparameters"]!["adapterDtype"] = "bf16"; }), 422, "hyperparameters.adapterDtype", "method 'dora' trains fp32 adapters" },
            { "lora+ ratio below 1", Edit(o => o["method"]!["loraPlusRatio"] = 0.5), 422, "method.loraPlusRatio", "between 1 and 1000" },
            { "lora+ ratio too large", Edit(o => o["method"]!["loraPlusRatio"] = 5000), 422, "method.loraPlusRatio", "between 1 and 1000" },
            { "lora+ ratio as string", Edit(o => o["method"]!["loraPlusRatio"] = "16"), 400, "method.loraPlusRatio", "must be a number" },
            { "dora with pissa init", Edit(o => { o["method"]!["type"] = "dora"; o["method"]!["init"] = "pissa"; }), 422, "method.init", "must be one of: default, gaussian" },
            { "dora alpha out of range", Edit(o => { o["method"]!["type"] = "dora"; o["method"]!["alpha"] = 0; }), 422, "method.alpha", "must be > 0" },
            { "dora r larger than a module", Edit(o => { o["method"]!["type"] = "dora"; o["method"]!["r"] = 40; }), 422, "method.r", "module v_proj with shape (32, 64)" },
            { "pissa r larger than a module", Edit(o => { o["method"]!["init"] = "pissa"; o["method"]!["r"] = 33; }), 422, "method.r", "module v_proj with shape (32, 64)" },
            { "merge not a boolean", Edit(o => o["merge"] = "yes"), 400, "merge", "has the wrong type" },
        };
    }

    [Theory]
    [MemberData(nameof(BadInputs))]
    public async Task Bad_input_is_refused_with_a_problem_naming_the_field(string why, string body, int status, string field, string message)
    {
        var client = await api.ClientAsync("submit-bad");
        var before = api.Dispatcher.Enqueued.Count;
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(body), Ct);

        Assert.True(status == (int)response.StatusCode, $"{why}: got {(int)response.StatusCode} {await response.Content.ReadAsStringAsync(Ct)}");
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        var problem = await response.JsonAsync();
        Assert.Equal(status, problem.GetProperty("status").GetInt32());
        var errors = problem.GetProperty("errors");
        Assert.True(errors.TryGetProperty(field, out var list), $"{why}: no error for '{field}' in {problem}");
        Assert.Contains(list.EnumerateArray(), e => e.GetString()!.Contains(message, StringComparison.Ordinal));
        Assert.DoesNotContain("FineTune.", problem.ToString()); // no .NET type names leak
        await using var db = api.Db();
        var tenant = await api.TenantIdAsync("submit-bad");
        Assert.False(await db.Jobs.AnyAsync(j => j.TenantId == tenant, Ct));
        Assert.Equal(before, api.Dispatcher.Enqueued.Count);
    }

    [Fact]
    public async Task Model_folder_without_config_json_is_422_on_model()
    {
        Directory.CreateDirectory(Path.Combine(api.ModelsRoot, "empty"));
        var client = await api.ClientAsync("submit-bad");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["model"] = $"file://{api.ModelsRoot}/empty")), Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, response.StatusCode);
        var errors = (await response.JsonAsync()).GetProperty("errors").GetProperty("model");
        Assert.Contains("no config.json", errors[0].GetString());
    }

    [Fact]
    public async Task Oversized_body_is_413_problem()
    {
        var client = await api.ClientAsync("submit-bad");
        var huge = Requests.LoraWith(o => o["adapterName"] = new string('a', 70 * 1024));
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(huge), Ct);
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        Assert.Contains("at most 65536 bytes", (await response.JsonAsync()).GetProperty("detail").GetString());
    }

    [Fact]
    public async Task Same_key_and_body_returns_the_same_job_and_a_different_body_conflicts()
    {
        var client = await api.ClientAsync("idem");
        HttpRequestMessage Post(string body, string key)
        {
            var m = new HttpRequestMessage(HttpMethod.Post, "/v1/fine-tunes") { Content = Requests.Body(body) };
            m.Headers.Add("Idempotency-Key", key);
            return m;
        }
        var first = await client.SendAsync(Post(Requests.Lora, "key-1"), Ct);
        Assert.Equal(HttpStatusCode.Accepted, first.StatusCode);
        var id = (await first.JsonAsync()).GetProperty("id").GetGuid();

        // Same request, other formatting and an explicit default: still the same request.
        var reformatted = Requests.LoraWith(o => o["priority"] = "normal");
        var again = await client.SendAsync(Post(reformatted, "key-1"), Ct);
        Assert.Equal(HttpStatusCode.OK, again.StatusCode);
        Assert.Equal(id, (await again.JsonAsync()).GetProperty("id").GetGuid());

        var different = await client.SendAsync(Post(Requests.LoraWith(o => o["method"]!["r"] = 4), "key-1"), Ct);
        Assert.Equal(HttpStatusCode.Conflict, different.StatusCode);
        Assert.Equal("application/problem+json", different.Content.Headers.ContentType?.MediaType);

        var otherKey = await client.SendAsync(Post(Requests.Lora, "key-2"), Ct);
        Assert.Equal(HttpStatusCode.Accepted, otherKey.StatusCode);
        Assert.NotEqual(id, (await otherKey.JsonAsync()).GetProperty("id").GetGuid());

        // The key is per tenant: another tenant may use the same one.
        var other = await api.ClientAsync("idem-other");
        var theirs = await other.SendAsync(Post(Requests.Lora, "key-1"), Ct);
        Assert.Equal(HttpStatusCode.Accepted, theirs.StatusCode);

        var tooLong = await client.SendAsync(Post(Requests.Lora, new string('k', 201)), Ct);
        Assert.Equal(HttpStatusCode.BadRequest, tooLong.StatusCode);
    }

    [Fact]
    public async Task Concurrent_submits_with_one_key_create_one_job()
    {
        var client = await api.ClientAsync("idem-race");
        var responses = await Task.WhenAll(Enumerable.Range(0, 8).Select(_ =>
        {
            var m = new HttpRequestMessage(HttpMethod.Post, "/v1/fine-tunes") { Content = Requests.Body(Requests.Bone) };
            m.Headers.Add("Idempotency-Key", "race");
            return client.SendAsync(m, Ct);
        }));
        Assert.All(responses, r => Assert.True(r.StatusCode is HttpStatusCode.Accepted or HttpStatusCode.OK, r.StatusCode.ToString()));
        var ids = await Task.WhenAll(responses.Select(async r => (await r.JsonAsync()).GetProperty("id").GetGuid()));
        Assert.Single(ids.Distinct());
        await using var db = api.Db();
        var tenant = await api.TenantIdAsync("idem-race");
        Assert.Equal(1, await db.Jobs.CountAsync(j => j.TenantId == tenant, Ct));
    }
}
