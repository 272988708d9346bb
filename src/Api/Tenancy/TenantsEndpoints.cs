using System.Security.Claims;
using System.Text.Json;
using FineTune.Api.Endpoints;
using FineTune.Api.Infrastructure;
using FineTune.Domain.Audit;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace FineTune.Api.Tenancy;

public sealed record TenantDto(Guid Id, string Name, DateTimeOffset CreatedAt, QuotasDto Quotas, UsageDto? Usage)
{
    public static TenantDto From(Tenant t, UsageDto? usage = null) => new(t.Id, t.Name, t.CreatedAt, QuotasDto.From(t), usage);
}

/// <summary>A tenant to create.</summary>
/// <param name="Name">Unique: <c>^[a-z0-9][a-z0-9._-]{0,63}$</c>.</param>
/// <param name="Quotas">Limits (default: none).</param>
public sealed record CreateTenantRequest(string Name, QuotasDto? Quotas = null);

/// <summary>An API key as listed: its prefix, never the key.</summary>
public sealed record KeyDto(Guid Id, Guid TenantId, string Prefix, string Role, string? Name, DateTimeOffset CreatedAt,
    DateTimeOffset? ExpiresAt, DateTimeOffset? RevokedAt, bool Active)
{
    public static KeyDto From(ApiKey k) => new(k.Id, k.TenantId, k.Prefix, k.Role, k.Name, k.CreatedAt, k.ExpiresAt, k.RevokedAt,
        k.IsActive(DateTimeOffset.UtcNow));
}

/// <summary>A new key: <see cref="Key"/> is shown this once; only its hash is stored.</summary>
public sealed record CreatedKeyDto(Guid Id, Guid TenantId, string Prefix, string Role, string? Name, DateTimeOffset CreatedAt,
    DateTimeOffset? ExpiresAt, string Key);

/// <summary>A key to create.</summary>
/// <param name="Role">admin (service operator), member (the tenant's jobs, adapters, webhooks) or reader (read and download).</param>
/// <param name="Name">A label (at most 100 characters).</param>
/// <param name="ExpiresAt">When the key stops working (default: never).</param>
public sealed record CreateKeyRequest(string Role, string? Name = null, DateTimeOffset? ExpiresAt = null);

public sealed record MeDto(TenantDto Tenant, KeyDto Key);

public sealed record AuditEventDto(long Id, DateTimeOffset At, Guid TenantId, Guid? ActorKeyId, Guid? ActorTenantId, string? ActorRole,
    string Action, string TargetType, string TargetId, JsonElement? Data)
{
    public static AuditEventDto From(AuditEvent e) => new(e.Id, e.At, e.TenantId, e.ActorKeyId, e.ActorTenantId, e.ActorRole,
        e.Action, e.TargetType, e.TargetId, e.Data is null ? null : JsonDocument.Parse(e.Data).RootElement.Clone());
}

/// <summary>The operator's endpoints (admin role): tenants, their quotas and keys, the audit log. And /v1/me for every key.</summary>
public static class TenantsEndpoints
{
    public static IEndpointRouteBuilder MapTenancy(this IEndpointRouteBuilder app)
    {
        var tenants = app.MapGroup("/v1/tenants").WithTags("Tenants").RequireAdmin();
        tenants.MapPost("/", Create).Accepts<CreateTenantRequest>("application/json")
            .Produces<TenantDto>(StatusCodes.Status201Created).ProducesProblem(409).ProducesValidationProblem(422)
            .WithName("CreateTenant").WithSummary("Create a tenant (admin)")
            .WithExamples(new CreateTenantRequest("team-search", Examples.Quotas), Examples.Tenant);
        tenants.MapGet("/", List).WithName("ListTenants").WithSummary("List tenants with their quotas and usage (admin)")
            .WithExamples(response: new[] { Examples.Tenant });
        tenants.MapGet("/{id:guid}", Get).WithName("GetTenant").WithSummary("Get a tenant with its quotas and usage (admin)")
            .WithExamples(response: Examples.Tenant);
        tenants.MapPut("/{id:guid}/quotas", SetQuotas).Accepts<QuotasDto>("application/json")
            .WithName("SetTenantQuotas").WithSummary("Replace a tenant's quotas (admin; null fields are unlimited)")
            .WithExamples(Examples.Quotas, Examples.Tenant);
        tenants.MapGet("/{id:guid}/keys", ListKeys).WithName("ListTenantKeys").WithSummary("List a tenant's API keys: prefixes only (admin)")
            .WithExamples(response: new[] { Examples.Key });
        tenants.MapPost("/{id:guid}/keys", CreateKey).Accepts<CreateKeyRequest>("application/json")
            .Produces<CreatedKeyDto>(StatusCodes.Status201Created).ProducesValidationProblem(422)
            .WithName("CreateTenantKey").WithSummary("Create an API key; the key is in this response only (admin)")
            .WithExamples(new CreateKeyRequest(Roles.Member, "ci", DateTimeOffset.Parse("2027-01-01T00:00:00Z")), Examples.CreatedKey);
        tenants.MapDelete("/{id:guid}/keys/{keyId:guid}", RevokeKey).WithName("RevokeTenantKey")
            .WithSummary("Revoke an API key: refused from the next request on (admin)")
            .WithExamples(response: Examples.Key with { RevokedAt = Examples.At, Active = false });

        app.MapGet("/v1/me", Me).WithTags("Tenants").RequireReader().WithName("GetMe")
            .WithSummary("The caller's tenant, quotas, usage and key").WithExamples(response: new MeDto(Examples.Tenant, Examples.Key));

        app.MapGet("/v1/audit", ListAudit).WithTags("Audit").RequireAdmin().WithName("ListAuditEvents")
            .WithSummary("Audit events, newest first (admin): who created, cancelled, promoted, deleted what, when")
            .WithDescription("Filter by tenantId, action (e.g. alias.moved), targetId; page with after = the last id seen.")
            .WithExamples(response: new Page<AuditEventDto>([Examples.Audit], "41"));
        return app;
    }

    private static async Task<Results<Created<TenantDto>, ProblemHttpResult>> Create(HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, SubmissionOptions pools, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<CreateTenantRequest>(http, ct);
        if (error is not null) return error;
        var quotas = request!.Quotas ?? new QuotasDto();
        var errors = quotas.Validate("quotas", pools.Pools);
        if (!Names.Slug().IsMatch(request.Name)) errors["name"] = ["must match ^[a-z0-9][a-z0-9._-]{0,63}$"];
        if (errors.Count > 0) return JsonBody.Unprocessable(errors);
        var tenant = new Tenant { Name = request.Name };
        quotas.ApplyTo(tenant);
        db.Tenants.Add(tenant);
        db.Audit(user, tenant.Id, AuditActions.TenantCreated, "tenant", tenant.Id, new { tenant.Name, quotas });
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (e.InnerException is PostgresException { SqlState: PostgresErrorCodes.UniqueViolation })
        {
            return JsonBody.Conflict($"A tenant named '{request.Name}' exists.", "Tenant exists");
        }
        return TypedResults.Created($"/v1/tenants/{tenant.Id}", TenantDto.From(tenant, new UsageDto(0, 0, 0)));
    }

    private static async Task<Ok<List<TenantDto>>> List(FineTuneDbContext db, CancellationToken ct)
    {
        var tenants = await db.Tenants.AsNoTracking().OrderBy(t => t.Name).Take(1000).ToListAsync(ct);
        var list = new List<TenantDto>();
        foreach (var t in tenants) list.Add(TenantDto.From(t, await UsageDto.ReadAsync(db, t.Id, ct)));
        return TypedResults.Ok(list);
    }

    private static async Task<Results<Ok<TenantDto>, ProblemHttpResult>> Get(Guid id, FineTuneDbContext db, CancellationToken ct) =>
        await db.Tenants.AsNoTracking().FirstOrDefaultAsync(t => t.Id == id, ct) is { } t
            ? TypedResults.Ok(TenantDto.From(t, await UsageDto.ReadAsync(db, t.Id, ct)))
            : JsonBody.NotFound($"tenant {id}");

    private static async Task<Results<Ok<TenantDto>, ProblemHttpResult>> SetQuotas(Guid id, HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, SubmissionOptions pools, CancellationToken ct)
    {
        var (quotas, error) = await JsonBody.ReadAsync<QuotasDto>(http, ct);
        if (error is not null) return error;
        var errors = quotas!.Validate("$", pools.Pools).ToDictionary(kv => kv.Key[2..], kv => kv.Value);
        if (errors.Count > 0) return JsonBody.Unprocessable(errors);
        var tenant = await db.Tenants.FirstOrDefaultAsync(t => t.Id == id, ct);
        if (tenant is null) return JsonBody.NotFound($"tenant {id}");
        var before = QuotasDto.From(tenant);
        quotas.ApplyTo(tenant);
        db.Audit(user, tenant.Id, AuditActions.TenantUpdated, "tenant", tenant.Id, new { before, after = quotas });
        await db.SaveChangesAsync(ct);
        return TypedResults.Ok(TenantDto.From(tenant, await UsageDto.ReadAsync(db, tenant.Id, ct)));
    }

    private static async Task<Results<Ok<List<KeyDto>>, ProblemHttpResult>> ListKeys(Guid id, FineTuneDbContext db, CancellationToken ct)
    {
        if (!await db.Tenants.AnyAsync(t => t.Id == id, ct)) return JsonBody.NotFound($"tenant {id}");
        var keys = await db.ApiKeys.AsNoTracking().Where(k => k.TenantId == id).OrderBy(k => k.CreatedAt).ToListAsync(ct);
        return TypedResults.Ok(keys.Select(KeyDto.From).ToList());
    }

    private static async Task<Results<Created<CreatedKeyDto>, ProblemHttpResult>> CreateKey(Guid id, HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<CreateKeyRequest>(http, ct);
        if (error is not null) return error;
        var errors = new Dictionary<string, string[]>();
        if (!Roles.All.Contains(request!.Role)) errors["role"] = ["must be one of: admin, member, reader"];
        if (request.Name is { Length: > 100 }) errors["name"] = ["must be at most 100 characters"];
        if (request.ExpiresAt <= DateTimeOffset.UtcNow) errors["expiresAt"] = ["must be in the future"];
        if (errors.Count > 0) return JsonBody.Unprocessable(errors);
        if (!await db.Tenants.AnyAsync(t => t.Id == id, ct)) return JsonBody.NotFound($"tenant {id}");
        var key = ApiKeys.Generate();
        var record = ApiKeys.NewRecord(id, key, request.Role, request.ExpiresAt?.ToUniversalTime(), request.Name, user.KeyId());
        db.ApiKeys.Add(record);
        db.Audit(user, id, AuditActions.KeyCreated, "api_key", record.Id, new { record.Prefix, record.Role, record.Name, record.ExpiresAt });
        await db.SaveChangesAsync(ct);
        return TypedResults.Created($"/v1/tenants/{id}/keys",
            new CreatedKeyDto(record.Id, id, record.Prefix, record.Role, record.Name, record.CreatedAt, record.ExpiresAt, key));
    }

    private static async Task<Results<Ok<KeyDto>, ProblemHttpResult>> RevokeKey(Guid id, Guid keyId, ClaimsPrincipal user,
        FineTuneDbContext db, CancellationToken ct)
    {
        var key = await db.ApiKeys.FirstOrDefaultAsync(k => k.Id == keyId && k.TenantId == id, ct);
        if (key is null) return JsonBody.NotFound($"key {keyId} in tenant {id}");
        if (key.RevokedAt is null)
        {
            key.RevokedAt = Domain.Jobs.Clock.Now();
            db.Audit(user, id, AuditActions.KeyRevoked, "api_key", key.Id, new { key.Prefix });
            await db.SaveChangesAsync(ct);
        }
        return TypedResults.Ok(KeyDto.From(key));
    }

    private static async Task<Ok<MeDto>> Me(ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenantId = user.TenantId();
        var tenant = await db.Tenants.AsNoTracking().SingleAsync(t => t.Id == tenantId, ct);
        var keyId = user.KeyId();
        var key = await db.ApiKeys.AsNoTracking().SingleAsync(k => k.Id == keyId, ct);
        return TypedResults.Ok(new MeDto(TenantDto.From(tenant, await UsageDto.ReadAsync(db, tenantId, ct)), KeyDto.From(key)));
    }

    private static async Task<Results<Ok<Page<AuditEventDto>>, ProblemHttpResult>> ListAudit(FineTuneDbContext db,
        Guid? tenantId, string? action, string? targetId, int? limit, string? after, CancellationToken ct)
    {
        var take = limit ?? 50;
        if (take is < 1 or > 500) return FineTunesEndpoints.BadQuery("limit", "must be between 1 and 500");
        var query = db.AuditEvents.AsNoTracking().AsQueryable();
        if (tenantId is not null) query = query.Where(e => e.TenantId == tenantId);
        if (action is not null) query = query.Where(e => e.Action == action);
        if (targetId is not null) query = query.Where(e => e.TargetId == targetId);
        if (after is not null)
        {
            if (!long.TryParse(after, out var afterId)) return FineTunesEndpoints.BadQuery("after", "is not a cursor returned by this API");
            query = query.Where(e => e.Id < afterId);
        }
        var rows = await query.OrderByDescending(e => e.Id).Take(take + 1).ToListAsync(ct);
        var page = rows.Take(take).ToList();
        return TypedResults.Ok(new Page<AuditEventDto>([.. page.Select(AuditEventDto.From)], rows.Count > take ? page[^1].Id.ToString() : null));
    }
}
