using System.IO.Compression;
using System.Net;
using System.Text.Json;
using System.Text.Json.Nodes;

[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace FineTune.EndToEnd.Tests;

/// <summary>Submit → train on a real worker → adapter in the registry; and cancel. Real Postgres, Quartz, libtorch, files.</summary>
public sealed class JobLifecycleTests(JobLifecycleTests.Fixture service) : IClassFixture<JobLifecycleTests.Fixture>
{
    public sealed class Fixture : IAsyncLifetime
    {
        public ServiceFixture Service { get; } = new();
        public async ValueTask InitializeAsync() { await Service.InitializeAsync(); await Service.StartWorkerAsync(); }
        public ValueTask DisposeAsync() => Service.DisposeAsync();
    }

    private ServiceFixture S => service.Service;
    private static readonly string[] AllModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [Fact]
    public async Task Bone_job_trains_publishes_a_PEFT_adapter_and_the_loss_falls()
    {
        var job = await S.SubmitAsync(S.JobBody(new { type = "bone", r = 16, targetModules = AllModules },
            new { epochs = 8, batchSize = 8, learningRate = 1e-2, maxSeqLength = 64, seed = 7, warmupSteps = 4 }, adapterName: "capitals-bone"));
        var id = job["id"]!.GetValue<string>();
        Assert.Equal("queued", ServiceFixture.Status(job));

        job = await S.WaitForAsync(id, ServiceFixture.Finished, TimeSpan.FromMinutes(4));
        Assert.Equal("succeeded", ServiceFixture.Status(job));
        Assert.Equal(job["progress"]!["totalSteps"]!.GetValue<int>(), job["progress"]!["step"]!.GetValue<int>());

        var metrics = JsonNode.Parse(await S.Client.GetStringAsync($"/v1/fine-tunes/{id}/metrics"))!;
        var rows = (metrics is JsonObject o ? o["data"]! : metrics).AsArray();
        Assert.True(rows.Count >= 2, "expected several logged steps");
        var first = rows[0]!["loss"]!.GetValue<double>();
        var last = rows[^1]!["loss"]!.GetValue<double>();
        // The base is a random tiny model (loss starts at ln 259 ≈ 5.56); adapters alone take it ~12% lower.
        Assert.True(last < first * 0.9, $"loss did not fall enough: {first} → {last}");

        var adapterId = job["adapterId"]!.GetValue<string>();
        var adapter = JsonNode.Parse(await S.Client.GetStringAsync($"/v1/adapters/{adapterId}"))!;
        Assert.Equal("capitals-bone", adapter["name"]!.GetValue<string>());
        Assert.Equal(1, adapter["version"]!.GetValue<int>());

        using var zip = new ZipArchive(await S.Client.GetStreamAsync($"/v1/adapters/{adapterId}/download"));
        var names = zip.Entries.Select(e => e.FullName).ToHashSet();
        Assert.Contains("adapter_model.safetensors", names);
        Assert.Contains("adapter_config.json", names);
        Assert.Contains("metadata.json", names);
        Assert.Contains("lora/adapter_model.safetensors", names);
        using var config = new StreamReader(zip.GetEntry("adapter_config.json")!.Open());
        var peft = JsonNode.Parse(await config.ReadToEndAsync())!;
        Assert.Equal("MISS", peft["peft_type"]!.GetValue<string>());
        Assert.Equal(16, peft["r"]!.GetValue<int>());
    }

    /// <summary>The second version is a DoRA job with <c>merge: true</c>: the option travels through the job row and
    /// the lease to the trainer, and the registry lists the merged model's files.</summary>
    [Fact]
    public async Task Lora_job_succeeds_and_versions_of_one_task_are_numbered()
    {
        var method = new { type = "lora", r = 4, alpha = 8, targetModules = new[] { "q_proj", "v_proj" } };
        var hyper = new { epochs = 1, batchSize = 8, learningRate = 3e-3, maxSeqLength = 64, seed = 3 };
        var a = await S.SubmitAsync(S.JobBody(method, hyper, "capitals-lora"));
        var doraMerged = JsonSerializer.SerializeToNode(S.JobBody(new { type = "dora", r = 4, alpha = 8, targetModules = new[] { "q_proj", "v_proj" } },
            hyper, "capitals-lora"))!.AsObject();
        doraMerged["merge"] = true;
        var b = await S.SubmitAsync(doraMerged);
        Assert.True(b["merge"]!.GetValue<bool>());
        var ja = await S.WaitForAsync(a["id"]!.GetValue<string>(), ServiceFixture.Finished, TimeSpan.FromMinutes(3));
        var jb = await S.WaitForAsync(b["id"]!.GetValue<string>(), ServiceFixture.Finished, TimeSpan.FromMinutes(3));
        Assert.Equal("succeeded", ServiceFixture.Status(ja));
        Assert.Equal("succeeded", ServiceFixture.Status(jb));
        var versions = new List<int>();
        foreach (var j in new[] { ja, jb })
        {
            var adapter = JsonNode.Parse(await S.Client.GetStringAsync($"/v1/adapters/{j["adapterId"]!.GetValue<string>()}"))!;
            versions.Add(adapter["version"]!.GetValue<int>());
            var peft = adapter["files"]!.AsArray().Select(f => f!["path"]!.GetValue<string>()).ToList();
            Assert.Contains("adapter_config.json", peft);
            Assert.Contains("lora/adapter_model.safetensors", peft);
            Assert.Equal(j == jb, peft.Contains("merged/model.safetensors"));
            Assert.Equal(j == jb, peft.Contains("merged/config.json"));
        }
        Assert.Equal([1, 2], versions.Order());
    }

    [Fact]
    public async Task Cancelling_a_running_job_stops_training_and_publishes_nothing()
    {
        var hyper = new { epochs = 100, batchSize = 4, learningRate = 1e-3, maxSeqLength = 64, seed = 1 };
        var job = await S.SubmitAsync(S.JobBody(new { type = "bone", r = 16 }, hyper, "capitals-cancel"));
        var id = job["id"]!.GetValue<string>();
        await S.WaitForAsync(id, j => ServiceFixture.Status(j) == "running" && j["progress"]!["step"]!.GetValue<int>() > 0,
            TimeSpan.FromMinutes(2));

        var cancel = await S.Client.PostAsync($"/v1/fine-tunes/{id}/cancel", null);
        Assert.True(cancel.IsSuccessStatusCode, await cancel.Content.ReadAsStringAsync());
        job = await S.WaitForAsync(id, ServiceFixture.Finished, TimeSpan.FromSeconds(60));
        Assert.Equal("cancelled", ServiceFixture.Status(job));
        Assert.Null(job["adapterId"]);
        var adapters = await S.Client.GetStringAsync("/v1/adapters?name=capitals-cancel");
        Assert.DoesNotContain("capitals-cancel", adapters);

        var again = await S.Client.PostAsync($"/v1/fine-tunes/{id}/cancel", null);
        Assert.Equal(HttpStatusCode.Conflict, again.StatusCode);
    }
}
