using System.Collections.Concurrent;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using FineTune.Domain;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using FineTune.Domain.Tokenizers;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Mvc.Testing;
using Microsoft.AspNetCore.TestHost;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Npgsql;

namespace FineTune.Api.Tests;

/// <summary>A fresh database ft_test_&lt;guid&gt; on the test server (FINETUNE_PG), dropped at the end.</summary>
public sealed class TestDatabase : IAsyncDisposable
{
    public static string ServerConnectionString =>
        Environment.GetEnvironmentVariable("FINETUNE_PG") is { Length: > 0 } cs ? cs : "Host=127.0.0.1;Port=55432;Username=postgres;Database=postgres";

    public string Name { get; } = $"ft_test_{Guid.NewGuid():N}";
    public string ConnectionString { get; }

    private TestDatabase()
    {
        ConnectionString = new NpgsqlConnectionStringBuilder(ServerConnectionString) { Database = Name, Pooling = true }.ConnectionString;
    }

    public static async Task<TestDatabase> CreateAsync()
    {
        var db = new TestDatabase();
        await using var conn = new NpgsqlConnection(ServerConnectionString);
        await conn.OpenAsync();
        await using var cmd = new NpgsqlCommand($"CREATE DATABASE \"{db.Name}\"", conn);
        await cmd.ExecuteNonQueryAsync();
        return db;
    }

    public async ValueTask DisposeAsync()
    {
        NpgsqlConnection.ClearAllPools();
        await using var conn = new NpgsqlConnection(ServerConnectionString);
        await conn.OpenAsync();
        await using var cmd = new NpgsqlCommand($"DROP DATABASE IF EXISTS \"{Name}\" WITH (FORCE)", conn);
        await cmd.ExecuteNonQueryAsync();
    }
}

/// <summary>Records what the API asked the dispatcher; can be told to fail.</summary>
public sealed class RecordingDispatcher : IJobDispatcher
{
    public ConcurrentQueue<(Guid JobId, string Pool, int Priority)> Enqueued { get; } = new();
    public ConcurrentQueue<Guid> Interrupted { get; } = new();
    public bool Fail { get; set; }

    public Task EnqueueAsync(Guid jobId, string pool, int priority, CancellationToken ct)
    {
        if (Fail) throw new InvalidOperationException("dispatcher down (test)");
        Enqueued.Enqueue((jobId, pool, priority));
        return Task.CompletedTask;
    }

    public Task InterruptAsync(Guid jobId, CancellationToken ct)
    {
        if (Fail) throw new InvalidOperationException("dispatcher down (test)");
        Interrupted.Enqueue(jobId);
        return Task.CompletedTask;
    }
}

/// <summary>
/// The API on a fresh database and a temporary storage root holding a tiny model folder (config.json only) and a
/// small dataset. One per test class.
/// </summary>
public class ApiFactory : WebApplicationFactory<Program>, IAsyncLifetime
{
    public TestDatabase Database { get; private set; } = null!;
    public string StorageRoot { get; } = Path.Combine(Path.GetTempPath(), $"ft-api-tests-{Guid.NewGuid():N}");
    public string ModelsRoot => Path.Combine(StorageRoot, "models");
    public string DataRoot => Path.Combine(StorageRoot, "datasets");
    public string ArtifactRoot => Path.Combine(StorageRoot, "artifacts");
    public RecordingDispatcher Dispatcher { get; } = new();
    public string BootstrapKey { get; } = ApiKeys.Generate();
    protected virtual bool UseRecordingDispatcher => true;

    public static readonly JsonSerializerOptions Json = DomainJson.Options;

    public async ValueTask InitializeAsync()
    {
        Database = await TestDatabase.CreateAsync();
        Directory.CreateDirectory(Path.Combine(ModelsRoot, "tiny"));
        Directory.CreateDirectory(DataRoot);
        Directory.CreateDirectory(ArtifactRoot);
        // A Llama-shaped toy: q (64,64), k/v (32,64), o (64,64), gate/up (128,64), down (64,128), with the tiny
        // byte-level tokenizer; the API reads only config.json and the tokenizer, and hashes the weights file.
        WriteTinyModel(Path.Combine(ModelsRoot, "tiny"));
        await File.WriteAllTextAsync(Path.Combine(DataRoot, "train.jsonl"), """
            {"prompt": "2+2=", "completion": "4"}
            {"prompt": "3+3=", "completion": "6"}

            """);
        _ = Server; // start the host now: migrations and bootstrap run before any test
    }

    /// <summary>config.json, the tiny tokenizer, and a valid safetensors file with no tensors as the weights.</summary>
    public static void WriteTinyModel(string dir, int hiddenSize = 64)
    {
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), $$"""
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259, "hidden_size": {{hiddenSize}},
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
            """);
        TinyTokenizer.WriteFiles(dir);
        var header = "{\"__metadata__\":{\"format\":\"pt\"}}"u8.ToArray();
        File.WriteAllBytes(Path.Combine(dir, "model.safetensors"), [.. BitConverter.GetBytes((long)header.Length), .. header]);
    }

    protected override void ConfigureWebHost(IWebHostBuilder builder)
    {
        builder.UseEnvironment("Testing");
        builder.UseSetting("ConnectionStrings:Postgres", Database.ConnectionString);
        builder.UseSetting("Storage:Root", StorageRoot);
        builder.UseSetting("Pools:0", "cpu");
        builder.UseSetting("Pools:1", "gpu-a100");
        builder.UseSetting("Models:tiny-registered", Path.Combine(ModelsRoot, "tiny"));
        builder.UseSetting("Bootstrap:ApiKey", BootstrapKey);
        builder.UseSetting("Bootstrap:Tenant", "bootstrap");
        builder.UseSetting("Serilog:MinimumLevel", "Warning");
        if (UseRecordingDispatcher)
            builder.ConfigureTestServices(s => s.Replace(ServiceDescriptor.Singleton<IJobDispatcher>(Dispatcher)));
        foreach (var (key, value) in Settings) builder.UseSetting(key, value);
    }

    /// <summary>Extra configuration of a factory subclass (limits, remote-fetch rules).</summary>
    protected virtual IEnumerable<(string Key, string Value)> Settings => [];

    public FineTuneDbContext Db() =>
        new(new DbContextOptionsBuilder<FineTuneDbContext>().UseNpgsql(Database.ConnectionString).Options);

    /// <summary>A client authenticated as a new key of <paramref name="tenant"/> (created if missing).</summary>
    public async Task<HttpClient> ClientAsync(string tenant, string role = Roles.Admin)
    {
        var key = await KeyAsync(tenant, role);
        var client = CreateClient();
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return client;
    }

    public async Task<string> KeyAsync(string tenant, string role = Roles.Admin)
    {
        var key = ApiKeys.Generate();
        await using var db = Db();
        await db.EnsureTenantKeyAsync(tenant, key, role, CancellationToken.None);
        return key;
    }

    public async Task<Guid> TenantIdAsync(string tenant)
    {
        await using var db = Db();
        return (await db.Tenants.SingleAsync(t => t.Name == tenant)).Id;
    }

    public override async ValueTask DisposeAsync()
    {
        await base.DisposeAsync();
        await Database.DisposeAsync();
        try { Directory.Delete(StorageRoot, recursive: true); } catch (IOException) { }
        GC.SuppressFinalize(this);
    }
}

public sealed class RealDispatchApiFactory : ApiFactory
{
    protected override bool UseRecordingDispatcher => false;
}

public static class Requests
{
    public const string Lora = """
        {"model": "tiny", "trainingData": "train.jsonl",
         "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "rslora": false, "targetModules": ["q_proj", "v_proj"]},
         "hyperparameters": {"epochs": 1, "batchSize": 2, "learningRate": 0.001},
         "adapterName": "my-adapter"}
        """;

    public const string Bone = """
        {"model": "tiny-registered", "trainingData": "train.jsonl",
         "method": {"type": "bone", "r": 16, "targetModules": ["gate_proj", "up_proj"]},
         "adapterName": "bone.adapter_1", "pool": "gpu-a100", "priority": "high"}
        """;

    public static StringContent Body(string json) => new(json, System.Text.Encoding.UTF8, "application/json");

    /// <summary>The lora request with one JSON edit applied (a node path and its new value, or null to remove it).</summary>
    public static string LoraWith(Action<System.Text.Json.Nodes.JsonObject> edit)
    {
        var node = System.Text.Json.Nodes.JsonNode.Parse(Lora)!.AsObject();
        edit(node);
        return node.ToJsonString();
    }

    public static async Task<JsonElement> JsonAsync(this HttpResponseMessage response) =>
        (await response.Content.ReadFromJsonAsync<JsonElement>());
}
