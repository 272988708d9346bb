using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Tenants;
using FineTune.Worker;
using FineTune.Worker.Training.Model;
using FineTune.Domain.Tokenizers;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.Extensions.Hosting;
using Npgsql;

namespace FineTune.EndToEnd.Tests;

/// <summary>
/// The whole service on this machine: a fresh Postgres database, the API (in-process test server), worker nodes
/// (in-process hosts, or real child processes for the crash test), a tiny model and a sample dataset on disk.
/// </summary>
public sealed class ServiceFixture(IReadOnlyDictionary<string, string>? extraSettings = null) : IAsyncLifetime
{
    public static readonly string AdminConnectionString =
        Environment.GetEnvironmentVariable("FINETUNE_PG") ?? "Host=127.0.0.1;Port=55432;Username=postgres;Database=postgres";

    private readonly string _database = $"ft_e2e_{Guid.NewGuid():n}";
    private WebApplicationFactory<Program>? _api;
    private readonly List<IHost> _workers = [];
    private readonly List<Process> _processes = [];

    public string Root { get; } = Directory.CreateTempSubdirectory("ft-e2e-").FullName;
    public string ConnectionString { get; private set; } = "";
    public string ApiKey { get; } = ApiKeys.Generate();
    public string ModelDir => Path.Combine(Root, "models", "tiny");
    public string DatasetPath => Path.Combine(Root, "datasets", "capitals.jsonl");
    public HttpClient Client { get; private set; } = null!;

    public async ValueTask InitializeAsync()
    {
        await using (var admin = new NpgsqlConnection(AdminConnectionString))
        {
            await admin.OpenAsync();
            await using var cmd = new NpgsqlCommand($"CREATE DATABASE {_database}", admin);
            await cmd.ExecuteNonQueryAsync();
        }
        ConnectionString = new NpgsqlConnectionStringBuilder(AdminConnectionString) { Database = _database }.ConnectionString;
        TinyModel.Write(ModelDir, seed: 1234);
        TinyTokenizer.WriteFiles(ModelDir);
        SampleData.Write(DatasetPath);

        _api = new WebApplicationFactory<Program>().WithWebHostBuilder(b =>
        {
            foreach (var (key, value) in Settings()) b.UseSetting(key, value);
        });
        Client = _api.CreateClient();
        Client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", ApiKey);
        (await Client.GetAsync("/health/ready")).EnsureSuccessStatusCode();
    }

    /// <summary>Configuration shared by the API and the workers; timings shortened so failover happens in seconds.</summary>
    public Dictionary<string, string> Settings() => new Dictionary<string, string>
    {
        ["ConnectionStrings:Postgres"] = ConnectionString,
        ["Storage:Root"] = Root,
        ["Bootstrap:ApiKey"] = ApiKey,
        ["Dispatch:IdleWaitTime"] = "00:00:01",
        ["Dispatch:CheckinInterval"] = "00:00:01",
        ["Dispatch:CheckinMisfireThreshold"] = "00:00:02",
        ["Worker:HeartbeatInterval"] = "00:00:00.500",
        ["Worker:LeaseTimeout"] = "00:00:04",
        ["Worker:ReconcileInterval"] = "00:00:02",
        ["Worker:LogEvery"] = "2",
        ["Worker:CheckpointEvery"] = "5",
        ["Serilog:MinimumLevel"] = "Warning",
    }.Concat(extraSettings ?? new Dictionary<string, string>()).ToDictionary();

    /// <summary>Starts a worker node inside the test process.</summary>
    public async Task<IHost> StartWorkerAsync()
    {
        var args = Settings().Select(kv => $"--{kv.Key}={kv.Value}").ToArray();
        var host = WorkerHost.CreateBuilder(args).Build();
        await host.StartAsync();
        lock (_workers) _workers.Add(host);
        return host;
    }

    /// <summary>Starts a worker node as a real child process (so that it can be killed like a crashed machine).</summary>
    public Process StartWorkerProcess(string name)
    {
        var dll = Path.Combine(AppContext.BaseDirectory, "FineTune.Worker.dll");
        var psi = new ProcessStartInfo("dotnet", [dll]) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var (key, value) in Settings()) psi.Environment[key.Replace(":", "__")] = value;
        psi.Environment["Worker__NodeName"] = name;
        var process = Process.Start(psi)!;
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        lock (_processes) _processes.Add(process);
        return process;
    }

    public async Task<JsonObject> SubmitAsync(object body, HttpStatusCode expected = HttpStatusCode.Accepted)
    {
        var response = await Client.PostAsJsonAsync("/v1/fine-tunes", body);
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == expected, $"POST /v1/fine-tunes answered {(int)response.StatusCode}: {text}");
        return JsonNode.Parse(text)!.AsObject();
    }

    public object JobBody(object method, object? hyperparameters = null, string adapterName = "capitals") => new
    {
        model = "file://" + ModelDir,
        trainingData = "file://" + DatasetPath,
        method,
        hyperparameters = hyperparameters ?? new { epochs = 2, batchSize = 8, learningRate = 3e-3, maxSeqLength = 64, seed = 7, warmupSteps = 2 },
        adapterName,
        pool = "cpu",
    };

    public async Task<JsonObject> GetJobAsync(string id) =>
        JsonNode.Parse(await Client.GetStringAsync($"/v1/fine-tunes/{id}"))!.AsObject();

    /// <summary>Polls the job until <paramref name="done"/> holds or the time runs out (then fails with the job's state).</summary>
    public async Task<JsonObject> WaitForAsync(string id, Func<JsonObject, bool> done, TimeSpan timeout)
    {
        var stopwatch = Stopwatch.StartNew();
        JsonObject job;
        do
        {
            job = await GetJobAsync(id);
            if (done(job)) return job;
            await Task.Delay(250);
        } while (stopwatch.Elapsed < timeout);
        var events = await Client.GetStringAsync($"/v1/fine-tunes/{id}/events");
        Assert.Fail($"job {id} did not reach the expected state in {timeout}: {job.ToJsonString()}\nevents: {events}");
        return job;
    }

    public static string Status(JsonObject job) => job["status"]!.GetValue<string>();

    public static bool Finished(JsonObject job) => Status(job) is "succeeded" or "failed" or "cancelled";

    public async ValueTask DisposeAsync()
    {
        foreach (var p in _processes)
        {
            try { if (!p.HasExited) p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            p.Dispose();
        }
        foreach (var w in _workers)
        {
            try { await w.StopAsync(TimeSpan.FromSeconds(10)); } catch (OperationCanceledException) { }
            w.Dispose();
        }
        Client?.Dispose();
        if (_api is not null) await _api.DisposeAsync();
        NpgsqlConnection.ClearAllPools();
        await using (var admin = new NpgsqlConnection(AdminConnectionString))
        {
            await admin.OpenAsync();
            await using var cmd = new NpgsqlCommand($"DROP DATABASE IF EXISTS {_database} WITH (FORCE)", admin);
            await cmd.ExecuteNonQueryAsync();
        }
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { }
    }
}
