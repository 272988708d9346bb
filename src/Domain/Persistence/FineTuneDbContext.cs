using System.Text;
using System.Text.Json;
using FineTune.Domain.Adapters;
using FineTune.Domain.Audit;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Domain.Tenants;
using FineTune.Domain.Webhooks;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.ChangeTracking;
using Microsoft.EntityFrameworkCore.Metadata.Builders;

namespace FineTune.Domain.Persistence;

/// <summary>
/// The service's tables (snake_case, created by the SQL files in Migrations/, never by EF). Typed values (method,
/// hyperparameters, adapter files) are jsonb written with <see cref="DomainJson.Options"/>.
/// </summary>
public sealed class FineTuneDbContext(DbContextOptions<FineTuneDbContext> options) : DbContext(options)
{
    public DbSet<FineTuneJob> Jobs => Set<FineTuneJob>();
    public DbSet<JobEvent> JobEvents => Set<JobEvent>();
    public DbSet<JobMetric> JobMetrics => Set<JobMetric>();
    public DbSet<JobCheckpoint> JobCheckpoints => Set<JobCheckpoint>();
    public DbSet<Adapter> Adapters => Set<Adapter>();
    public DbSet<Tenant> Tenants => Set<Tenant>();
    public DbSet<ApiKey> ApiKeys => Set<ApiKey>();
    public DbSet<AuditEvent> AuditEvents => Set<AuditEvent>();
    public DbSet<AdapterAlias> AdapterAliases => Set<AdapterAlias>();
    public DbSet<Webhook> Webhooks => Set<Webhook>();
    public DbSet<WebhookDelivery> WebhookDeliveries => Set<WebhookDelivery>();
    public DbSet<BaseModel> BaseModels => Set<BaseModel>();

    protected override void OnModelCreating(ModelBuilder b)
    {
        b.Entity<FineTuneJob>(e =>
        {
            e.ToTable("fine_tune_jobs");
            e.Property(j => j.Status).HasConversion(s => s.ToWire(), s => Enum.Parse<JobStatus>(s, true));
            Json(e.Property(j => j.Method));
            Json(e.Property(j => j.Hyperparameters));
            e.HasMany(j => j.Events).WithOne().HasForeignKey(ev => ev.JobId);
            e.HasIndex(j => new { j.TenantId, j.IdempotencyKey }).IsUnique().HasFilter("idempotency_key IS NOT NULL")
                .HasDatabaseName("ux_fine_tune_jobs_idempotency");
            e.HasIndex(j => j.Status).HasDatabaseName("ix_fine_tune_jobs_status");
            e.Ignore(j => j.IsFinished);
        });
        b.Entity<JobEvent>(e =>
        {
            e.ToTable("job_events");
            e.Property(ev => ev.Id).UseIdentityByDefaultColumn();
            e.Property(ev => ev.Data).HasColumnType("jsonb");
        });
        b.Entity<JobMetric>(e => { e.ToTable("job_metrics"); e.HasKey(m => new { m.JobId, m.Step }); });
        b.Entity<JobCheckpoint>(e => { e.ToTable("job_checkpoints"); e.HasKey(c => new { c.JobId, c.Step }); });
        b.Entity<Adapter>(e =>
        {
            e.ToTable("adapters");
            Json(e.Property(a => a.Files));
            Json(e.Property(a => a.Metadata));
            e.Property(a => a.Method).HasColumnType("jsonb");
            e.Property(a => a.Hyperparameters).HasColumnType("jsonb");
            e.HasIndex(a => new { a.TenantId, a.Name, a.Version }).IsUnique();
        });
        b.Entity<AdapterAlias>(e => { e.ToTable("adapter_aliases"); e.HasKey(a => new { a.TenantId, a.Task, a.Alias }); });
        b.Entity<AuditEvent>(e =>
        {
            e.ToTable("audit_events");
            e.Property(a => a.Id).UseIdentityByDefaultColumn();
            e.Property(a => a.Data).HasColumnType("jsonb");
        });
        b.Entity<Webhook>(e => e.ToTable("webhooks"));
        b.Entity<WebhookDelivery>(e =>
        {
            e.ToTable("webhook_deliveries");
            e.Property(d => d.AttemptLog).HasColumnType("jsonb");
        });
        b.Entity<Tenant>(e => { e.ToTable("tenants"); e.HasIndex(t => t.Name).IsUnique(); });
        b.Entity<ApiKey>(e => { e.ToTable("api_keys"); e.HasIndex(k => k.Prefix); });
        b.Entity<BaseModel>(e =>
        {
            e.ToTable("base_models");
            e.HasIndex(m => m.Name).IsUnique();
            Json(e.Property(m => m.Modules));
        });

        foreach (var entity in b.Model.GetEntityTypes())
            foreach (var p in entity.GetProperties())
                p.SetColumnName(SnakeCase(p.Name));
        b.Entity<FineTuneJob>().Property(j => j.Version).IsRowVersion().HasColumnName("xmin").HasColumnType("xid");
    }

    /// <summary>A typed value in a jsonb column, compared by its JSON so in-place changes are noticed.</summary>
    private static void Json<T>(PropertyBuilder<T> property) where T : class =>
        property.HasColumnType("jsonb")
            .HasConversion(
                v => JsonSerializer.Serialize(v, DomainJson.Options),
                s => JsonSerializer.Deserialize<T>(s, DomainJson.Options)!,
                new ValueComparer<T>(
                    (a, c) => JsonSerializer.Serialize(a, DomainJson.Options) == JsonSerializer.Serialize(c, DomainJson.Options),
                    v => JsonSerializer.Serialize(v, DomainJson.Options).GetHashCode(),
                    v => JsonSerializer.Deserialize<T>(JsonSerializer.Serialize(v, DomainJson.Options), DomainJson.Options)!));

    public static string SnakeCase(string name)
    {
        var sb = new StringBuilder(name.Length + 8);
        for (var i = 0; i < name.Length; i++)
        {
            var c = name[i];
            if (char.IsUpper(c))
            {
                if (i > 0 && (char.IsLower(name[i - 1]) || i + 1 < name.Length && char.IsLower(name[i + 1]) && char.IsUpper(name[i - 1])))
                    sb.Append('_');
                sb.Append(char.ToLowerInvariant(c));
            }
            else sb.Append(c);
        }
        return sb.ToString();
    }
}
