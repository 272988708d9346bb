using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using FineTune.Tests.Support;

namespace FineTune.EndToEnd.Tests;

/// <summary>The worker trains on exactly what the API validated: a dataset that changed after submit fails the job.</summary>
public sealed class DatasetChangeTests : IAsyncLifetime
{
    private readonly ServiceFixture _s = new();
    public ValueTask InitializeAsync() => _s.InitializeAsync();
    public ValueTask DisposeAsync() => _s.DisposeAsync();

    [Fact]
    public async Task A_dataset_changed_after_submit_fails_the_job_clearly()
    {
        var path = Path.Combine(_s.Root, "datasets", "changing.jsonl");
        File.Copy(_s.DatasetPath, path);
        var body = System.Text.Json.JsonSerializer.SerializeToNode(_s.JobBody(new { type = "lora", r = 4 }))!.AsObject();
        body["trainingData"] = "changing.jsonl"; // relative to the data roots: resolved the same way by the worker
        var job = await _s.SubmitAsync(body);
        var id = job["id"]!.GetValue<string>();
        var submitted = job["dataset"]!["sha256"]!.GetValue<string>();
        await File.AppendAllTextAsync(path, "{\"prompt\": \"added \", \"completion\": \"later\"}\n");

        await _s.StartWorkerAsync(); // only now can the job run
        job = await _s.WaitForAsync(id, ServiceFixture.Finished, TimeSpan.FromMinutes(2));
        Assert.Equal("failed", ServiceFixture.Status(job));
        Assert.Equal("dataset_changed", job["error"]!["code"]!.GetValue<string>());
        var message = job["error"]!["message"]!.GetValue<string>();
        Assert.Contains("trainingData: the dataset changed since the job was submitted", message);
        Assert.Contains($"at submit {submitted}", message);
    }
}

/// <summary>A model and a dataset served over HTTP (from 127.0.0.1, allowed for this test): the API fetches only the
/// small files, the worker downloads the weights once into the shared cache and verifies the registered checksum.</summary>
public sealed class RemoteModelTests : IAsyncLifetime
{
    private readonly ServiceFixture _s = new(new Dictionary<string, string>
    {
        ["Remote:AllowHttp"] = "true", ["Remote:AllowedNetworks:0"] = "127.0.0.1/32",
    });
    private LocalHttpServer _server = null!;

    public async ValueTask InitializeAsync()
    {
        await _s.InitializeAsync();
        _server = await LocalHttpServer.StartAsync();
        _server.Folder("/models/tiny", _s.ModelDir);
        _server.File("/capitals.jsonl", File.ReadAllBytes(_s.DatasetPath));
        await _s.StartWorkerAsync();
    }

    public async ValueTask DisposeAsync()
    {
        await _s.DisposeAsync();
        await _server.DisposeAsync();
    }

    private async Task<JsonObject> Register(string name, string sha256)
    {
        var response = await _s.Client.PostAsJsonAsync("/v1/admin/base-models", new { name, uri = _server.Url("/models/tiny/"), sha256 });
        Assert.True(response.StatusCode == HttpStatusCode.Created, await response.Content.ReadAsStringAsync());
        return JsonNode.Parse(await response.Content.ReadAsStringAsync())!.AsObject();
    }

    private object Body(string model, string adapterName) => new
    {
        model, trainingData = _server.Url("/capitals.jsonl"), adapterName,
        method = new { type = "lora", r = 4, targetModules = new[] { "q_proj", "v_proj" } },
        hyperparameters = new { maxSteps = 3, batchSize = 4, maxSeqLength = 64, packing = true, validationSplit = 0.1 },
    };

    [Fact]
    public async Task Jobs_train_on_a_remote_model_fetched_once_and_a_wrong_checksum_fails()
    {
        var sha = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(Path.Combine(_s.ModelDir, "model.safetensors"))));
        await Register("remote-tiny", sha);
        await Register("remote-tiny-wrong", new string('a', 64));

        var a = await _s.SubmitAsync(Body("remote-tiny", "remote-a"));
        var b = await _s.SubmitAsync(Body("remote-tiny", "remote-b"));
        var ja = await _s.WaitForAsync(a["id"]!.GetValue<string>(), ServiceFixture.Finished, TimeSpan.FromMinutes(3));
        var jb = await _s.WaitForAsync(b["id"]!.GetValue<string>(), ServiceFixture.Finished, TimeSpan.FromMinutes(3));
        Assert.True(ServiceFixture.Status(ja) == "succeeded", ja.ToJsonString());
        Assert.Equal("succeeded", ServiceFixture.Status(jb));
        Assert.Equal(1, _server.HitsOf("/models/tiny/model.safetensors"));
        Assert.Equal(4, _server.HitsOf("/capitals.jsonl")); // each job's dataset: fetched at submit and again by the worker

        var adapter = JsonNode.Parse(await _s.Client.GetStringAsync($"/v1/adapters/{ja["adapterId"]!.GetValue<string>()}"))!;
        var meta = adapter["metadata"]!;
        Assert.Equal(_server.Url("/models/tiny/"), meta["base_model"]!["uri"]!.GetValue<string>());
        Assert.Equal(sha, meta["base_model"]!["weights_sha256"]!.GetValue<string>());
        Assert.Equal(ja["dataset"]!["sha256"]!.GetValue<string>(), meta["dataset_sha256"]!.GetValue<string>());
        Assert.Equal("split", meta["data"]!["validation"]!.GetValue<string>());
        Assert.True(meta["data"]!["packing"]!.GetValue<bool>());

        var bad = await _s.SubmitAsync(Body("remote-tiny-wrong", "remote-bad"));
        var jbad = await _s.WaitForAsync(bad["id"]!.GetValue<string>(), ServiceFixture.Finished, TimeSpan.FromMinutes(2));
        Assert.Equal("failed", ServiceFixture.Status(jbad));
        Assert.Equal("model_unavailable", jbad["error"]!["code"]!.GetValue<string>());
        Assert.Contains($"not the expected {new string('a', 64)}", jbad["error"]!["message"]!.GetValue<string>());
    }
}
