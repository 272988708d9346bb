using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace FineTune.Api.Tests;

/// <summary>Migrations, transitions and the runner's fenced writes, straight on a fresh database (no HTTP).</summary>
public sealed class PersistenceTests : IAsyncLifetime
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private TestDatabase _db = null!;

    public async ValueTask InitializeAsync() => _db = await TestDatabase.CreateAsync();
    public ValueTask DisposeAsync() => _db.DisposeAsync();

    private FineTuneDbContext Db() => new(new DbContextOptionsBuilder<FineTuneDbContext>().UseNpgsql(_db.ConnectionString).Options);

    private async Task<long> ScalarAsync(string sql)
    {
        await using var conn = new NpgsqlConnection(_db.ConnectionString);
        await conn.OpenAsync(Ct);
        await using var cmd = new NpgsqlCommand(sql, conn);
        return Convert.ToInt64(await cmd.ExecuteScalarAsync(Ct));
    }

    [Fact]
    public async Task Migrations_apply_once_even_when_run_twice_and_concurrently()
    {
        var results = await Task.WhenAll(
            DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct),
            DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct),
            DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct));
        var all = DatabaseMigrator.Migrations.Select(m => m.Version).ToList();
        Assert.True(all.Count >= 1 && all[0] == 1);
        Assert.Equal(all, results.SelectMany(r => r).Order()); // each version applied by exactly one migrator
        Assert.Empty(await DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct));
        Assert.Equal(all.Count, await ScalarAsync("SELECT count(*) FROM schema_migrations"));
        Assert.Equal(1, await ScalarAsync("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'quartz'"));
        Assert.Equal(1, await ScalarAsync("SELECT count(*) FROM information_schema.tables WHERE table_name = 'fine_tune_jobs'"));
    }

    private async Task<FineTuneJob> NewJobAsync(FineTuneDbContext db)
    {
        var tenant = new Tenant { Name = $"t-{Guid.NewGuid():N}" };
        db.Tenants.Add(tenant);
        await db.SaveChangesAsync(Ct); // no navigation between them: EF would not order the inserts
        var job = new FineTuneJob
        {
            TenantId = tenant.Id, Model = "tiny", ModelPath = "/models/tiny", TrainingData = "train.jsonl",
            Method = new BoneMethod { R = 16, TargetModules = ["q_proj"] }, Hyperparameters = new Hyperparameters { Epochs = 2 },
            AdapterName = "a", Pool = "cpu", Priority = 5,
        };
        job.Created();
        db.Jobs.Add(job);
        await db.SaveChangesAsync(Ct);
        return job;
    }

    [Fact]
    public async Task Jobs_round_trip_with_jsonb_method_and_lowercase_status()
    {
        await DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct);
        await using var db = Db();
        var job = await NewJobAsync(db);
        await using var fresh = Db();
        var loaded = await fresh.Jobs.SingleAsync(j => j.Id == job.Id, Ct);
        Assert.Equal(16, Assert.IsType<BoneMethod>(loaded.Method).R);
        Assert.Equal(2, loaded.Hyperparameters.Epochs);
        Assert.Equal(job.CreatedAt, loaded.CreatedAt);
        Assert.Equal(1, await ScalarAsync($"SELECT count(*) FROM fine_tune_jobs WHERE status = 'queued' AND method->>'type' = 'bone' AND (method->>'r')::int = 16"));
        Assert.NotEqual(0u, loaded.Version);
    }

    [Fact]
    public async Task Illegal_transitions_are_refused()
    {
        await DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct);
        await using var db = Db();
        var job = await NewJobAsync(db);
        Assert.Throws<InvalidJobTransitionException>(() => job.Succeed(Guid.NewGuid()));
        Assert.Throws<InvalidJobTransitionException>(() => job.Requeue("x"));
        Assert.Throws<InvalidJobTransitionException>(() => job.RequestCancel());
        job.Claim("n1");
        Assert.Throws<InvalidJobTransitionException>(() => job.Claim("n2"));
        job.Fail("oom", "out of memory");
        Assert.Throws<InvalidJobTransitionException>(() => job.Cancel("late"));
        Assert.Throws<InvalidJobTransitionException>(() => job.Requeue("late"));
        await db.SaveChangesAsync(Ct);
        Assert.Equal(["queued", "running", "failed"], await db.JobEvents.Where(e => e.JobId == job.Id).OrderBy(e => e.Id).Select(e => e.Type).ToListAsync(Ct));
    }

    [Fact]
    public async Task Of_concurrent_claimers_one_wins_and_a_stale_lease_is_fenced_off()
    {
        await DatabaseMigrator.MigrateAsync(_db.ConnectionString, Ct);
        Guid id;
        await using (var db = Db()) id = (await NewJobAsync(db)).Id;

        var contexts = Enumerable.Range(0, 6).Select(_ => Db()).ToList();
        var leases = await Task.WhenAll(contexts.Select((c, i) => c.TryClaimAsync(id, $"node-{i}", TimeSpan.FromMinutes(5), Ct)));
        foreach (var c in contexts) await c.DisposeAsync();
        var winner = Assert.Single(leases, l => l is not null)!;
        Assert.Equal(1, winner.Generation);

        await using var db2 = Db();
        // A live lease is not claimable; once its heartbeat is stale, another node takes over with a new generation.
        Assert.Null(await db2.TryClaimAsync(id, "node-x", TimeSpan.FromMinutes(5), Ct));
        await db2.Database.ExecuteSqlAsync($"UPDATE fine_tune_jobs SET heartbeat_at = now() - interval '10 minutes' WHERE id = {id}", Ct);
        var taker = await db2.TryClaimAsync(id, "node-x", TimeSpan.FromMinutes(5), Ct);
        Assert.NotNull(taker);
        Assert.Equal(2, taker.Generation);
        Assert.Equal(2, taker.Attempt);

        // The old holder can no longer write anything.
        Assert.Equal(LeaseState.Lost, await db2.HeartbeatAsync(winner, Ct));
        Assert.False(await db2.RecordMetricAsync(winner, new JobMetric { JobId = id, Step = 1, Loss = 1 }, Ct));
        Assert.False(await db2.RecordCheckpointAsync(winner, new JobCheckpoint { JobId = id, Step = 1, Path = "p", Sha256 = "s" }, Ct));
        Assert.False(await db2.AppendEventAsync(winner, "info", "x", null, Ct));
        Assert.Null(await db2.UpdateFencedAsync(winner, j => j.Succeed(Guid.NewGuid()), Ct));
        Assert.Equal(LeaseState.Held, await db2.HeartbeatAsync(taker, Ct));
        Assert.True(await db2.RecordMetricAsync(taker, new JobMetric { JobId = id, Step = 1, Loss = 1 }, Ct));
        Assert.True(await db2.RecordMetricAsync(taker, new JobMetric { JobId = id, Step = 1, Loss = 0.5 }, Ct)); // a repeated step replaces
        var done = await db2.UpdateFencedAsync(taker, j => j.Succeed(Guid.NewGuid()), Ct);
        Assert.Equal(JobStatus.Succeeded, done!.Status);

        await using var check = Db();
        Assert.Equal(0.5, (await check.JobMetrics.SingleAsync(m => m.JobId == id, Ct)).Loss);
        Assert.Equal(["queued", "running", "queued", "running", "succeeded"],
            await check.JobEvents.Where(e => e.JobId == id).OrderBy(e => e.Id).Select(e => e.Type).ToListAsync(Ct));
    }

    [Fact]
    public void Api_keys_have_the_documented_shape_and_verify_in_constant_time()
    {
        var key = ApiKeys.Generate();
        Assert.Matches("^ft_[0-9A-Za-z]{32}$", key);
        Assert.True(ApiKeys.LooksValid(key));
        Assert.True(ApiKeys.Matches(key, ApiKeys.Hash(key)));
        Assert.False(ApiKeys.Matches(ApiKeys.Generate(), ApiKeys.Hash(key)));
        Assert.False(ApiKeys.Matches(key, "not-hex"));
        Assert.False(ApiKeys.LooksValid("ft_short"));
        Assert.False(ApiKeys.LooksValid("ft_" + new string('!', 32)));
    }
}
