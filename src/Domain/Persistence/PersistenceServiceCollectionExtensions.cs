using FineTune.Domain.Tenants;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Npgsql;

namespace FineTune.Domain.Persistence;

public static class PersistenceServiceCollectionExtensions
{
    /// <summary>Registers <see cref="FineTuneDbContext"/> (pooled factory + scoped) on Postgres, and a shared data source.</summary>
    public static IServiceCollection AddFineTuneDb(this IServiceCollection services, string connectionString)
    {
        var dataSource = new NpgsqlDataSourceBuilder(connectionString).Build();
        services.AddSingleton(dataSource);
        services.AddPooledDbContextFactory<FineTuneDbContext>(o => o.UseNpgsql(dataSource));
        services.AddScoped(sp => sp.GetRequiredService<IDbContextFactory<FineTuneDbContext>>().CreateDbContext());
        return services;
    }

    /// <summary>
    /// Ensures the tenant exists and holds <paramref name="apiKey"/> as an admin key. Idempotent; races between two
    /// processes starting together end in the unique indexes, and the loser re-reads.
    /// </summary>
    public static async Task<Tenant> EnsureTenantKeyAsync(this FineTuneDbContext db, string tenantName, string apiKey,
        string role, CancellationToken ct)
    {
        if (!ApiKeys.LooksValid(apiKey)) throw new ArgumentException($"an API key is '{ApiKeys.KeyPrefix}' followed by 32 letters or digits");
        for (var attempt = 0; ; attempt++)
        {
            db.ChangeTracker.Clear();
            try
            {
                var tenant = await db.Tenants.FirstOrDefaultAsync(t => t.Name == tenantName, ct);
                if (tenant is null)
                {
                    tenant = new Tenant { Name = tenantName };
                    db.Tenants.Add(tenant);
                    await db.SaveChangesAsync(ct);
                }
                var hash = ApiKeys.Hash(apiKey);
                if (!await db.ApiKeys.AnyAsync(k => k.Hash == hash, ct))
                {
                    db.ApiKeys.Add(ApiKeys.NewRecord(tenant.Id, apiKey, role));
                    await db.SaveChangesAsync(ct);
                }
                return tenant;
            }
            catch (DbUpdateException e) when (attempt < 3 && e.InnerException is PostgresException { SqlState: PostgresErrorCodes.UniqueViolation })
            {
            }
        }
    }
}

/// <summary>Ready when the database answers and every embedded migration is applied.</summary>
public sealed class DatabaseReadyHealthCheck(NpgsqlDataSource dataSource) : IHealthCheck
{
    public async Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken ct = default)
    {
        try
        {
            await using var conn = await dataSource.OpenConnectionAsync(ct);
            var applied = await DatabaseMigrator.AppliedVersionAsync(conn, ct);
            return applied >= DatabaseMigrator.LatestVersion
                ? HealthCheckResult.Healthy($"schema version {applied}")
                : HealthCheckResult.Unhealthy($"schema version {applied}, expected {DatabaseMigrator.LatestVersion}");
        }
        catch (Exception e) when (e is NpgsqlException or TimeoutException or InvalidOperationException)
        {
            return HealthCheckResult.Unhealthy("database unreachable", e);
        }
    }
}
