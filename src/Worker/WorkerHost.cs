using FineTune.Domain.Datasets;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Models;
using FineTune.Domain.Remote;
using FineTune.Domain.Persistence;
using FineTune.Worker.Runner;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Npgsql;
using Serilog;
using Serilog.Formatting.Compact;

namespace FineTune.Worker;

/// <summary>The worker node: a member of the Quartz cluster that trains the jobs of the pools it serves.</summary>
public static class WorkerHost
{
    public static HostApplicationBuilder CreateBuilder(string[] args)
    {
        var builder = Host.CreateApplicationBuilder(args);
        var config = builder.Configuration;
        ConfigureLogging(builder);

        var connectionString = config.GetConnectionString("Postgres")
            ?? throw new InvalidOperationException("ConnectionStrings:Postgres is not configured.");
        var worker = config.GetSection(WorkerOptions.Section).Get<WorkerOptions>() ?? new WorkerOptions();
        builder.Services.Configure<WorkerOptions>(config.GetSection(WorkerOptions.Section));
        var storage = StorageSettings.From(config);
        builder.Services.AddSingleton(storage);

        worker.ParseComputeDType();   // a misspelt dtype stops the node at start, not its first job
        var slots = DeviceSlots.FromOptions(worker);
        builder.Services.AddSingleton(slots);
        builder.Services.AddSingleton(new ArtifactStore(storage.ArtifactRoot));
        builder.Services.AddSingleton(_ => new NpgsqlDataSourceBuilder(connectionString).Build());
        builder.Services.AddSingleton(RemoteOptions.From(config)).AddSingleton<RemoteFetcher>();
        builder.Services.AddSingleton(DatasetOptions.From(config));
        builder.Services.AddSingleton(sp => new ModelCache(storage.ModelCache, sp.GetRequiredService<RemoteFetcher>()));
        builder.Services.AddSingleton(sp => new DatasetSource(storage.DataRoots, sp.GetRequiredService<RemoteFetcher>(),
            sp.GetRequiredService<DatasetOptions>().Limits));
        builder.Services.AddSingleton<JobInputs>();
        builder.Services.AddSingleton<IJobRunner, JobRunner>();
        // Hosted services start in registration order: the schema first, then the Quartz node, then the reconciler.
        builder.Services.AddHostedService(_ => new MigrateOnStart(connectionString));
        builder.Services.AddFineTuneDispatch(config, connectionString, worker.Pools, slots.Count);
        builder.Services.AddHostedService<Reconciler>();
        return builder;
    }

    private static void ConfigureLogging(HostApplicationBuilder builder)
    {
        var logger = new LoggerConfiguration()
            .ReadFrom.Configuration(builder.Configuration)
            .Enrich.FromLogContext()
            .Enrich.WithProperty("Service", "worker");
        logger = builder.Configuration.GetValue<bool>("Logging:Json")
            ? logger.WriteTo.Console(new CompactJsonFormatter())
            : logger.WriteTo.Console(outputTemplate: "[{Timestamp:HH:mm:ss} {Level:u3}] {Message:lj} {Properties:j}{NewLine}{Exception}");
        builder.Logging.ClearProviders();
        builder.Logging.AddSerilog(logger.CreateLogger(), dispose: true);
    }

    /// <summary>Applies the schema before Quartz starts (registered first, so it runs first).</summary>
    private sealed class MigrateOnStart(string connectionString) : IHostedService
    {
        public Task StartAsync(CancellationToken ct) => DatabaseMigrator.MigrateAsync(connectionString, ct);
        public Task StopAsync(CancellationToken ct) => Task.CompletedTask;
    }
}

/// <summary>Where files live (section "Storage", as the API reads it): models/, datasets/, artifacts/ and model-cache/
/// under Root by default.</summary>
public sealed record StorageSettings(string ArtifactRoot, IReadOnlyList<string> ModelRoots, IReadOnlyList<string> DataRoots)
{
    /// <summary>Local copies of https:// models, shared with the API (<c>Storage:ModelCache</c>).</summary>
    public string ModelCache { get; init; } = Path.GetFullPath(Path.Combine(".data", "model-cache"));

    public static StorageSettings From(IConfiguration config)
    {
        var root = config["Storage:Root"] ?? ".data";
        string[] Roots(string key, string sub) =>
            [.. (config.GetSection(key).Get<string[]>() is { Length: > 0 } r ? r : [Path.Combine(root, sub)]).Select(Path.GetFullPath)];
        return new StorageSettings(Path.GetFullPath(config["Storage:ArtifactRoot"] ?? Path.Combine(root, "artifacts")),
            Roots("Storage:ModelRoots", "models"), Roots("Storage:DataRoots", "datasets"))
        {
            ModelCache = Path.GetFullPath(config["Storage:ModelCache"] ?? Path.Combine(root, "model-cache")),
        };
    }
}
