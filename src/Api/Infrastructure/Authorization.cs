using System.Security.Claims;
using System.Text.Json;
using FineTune.Domain;
using FineTune.Domain.Audit;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;

namespace FineTune.Api.Infrastructure;

/// <summary>
/// Roles are checked by policy on the endpoint, never inside handlers: <c>.RequireReader()</c> (any valid key),
/// <c>.RequireWriter()</c> (admin or member), <c>.RequireAdmin()</c> (the service operator). Data is always scoped to
/// the caller's tenant (<see cref="TenantClaims.TenantId"/>) whatever the role; only admin endpoints cross tenants.
/// </summary>
public static class AuthPolicies
{
    public const string Write = ApiKeyAuthenticationHandler.WritePolicy, Admin = "admin";

    public static IServiceCollection AddFineTuneAuthorization(this IServiceCollection services)
    {
        services.AddAuthorizationBuilder()
            .AddPolicy(Write, p => p.RequireRole(Roles.Admin, Roles.Member))
            .AddPolicy(Admin, p => p.RequireRole(Roles.Admin));
        return services;
    }

    /// <summary>Any valid key: admin, member or reader (read and download only).</summary>
    public static TBuilder RequireReader<TBuilder>(this TBuilder builder) where TBuilder : IEndpointConventionBuilder =>
        builder.RequireAuthorization();

    /// <summary>A key that may change its tenant's jobs, adapters and webhooks: admin or member.</summary>
    public static TBuilder RequireWriter<TBuilder>(this TBuilder builder) where TBuilder : IEndpointConventionBuilder =>
        builder.RequireAuthorization(Write);

    /// <summary>The service operator: tenants, keys, quotas, pools, base models, the audit log.</summary>
    public static TBuilder RequireAdmin<TBuilder>(this TBuilder builder) where TBuilder : IEndpointConventionBuilder =>
        builder.RequireAuthorization(Admin);
}

public static class TenantClaims
{
    public static Guid TenantId(this ClaimsPrincipal user) =>
        Guid.Parse(user.FindFirstValue(ApiKeyAuthenticationHandler.TenantClaim)
            ?? throw new InvalidOperationException("endpoint reached without an authenticated tenant"));

    public static Guid? KeyId(this ClaimsPrincipal user) =>
        Guid.TryParse(user.FindFirstValue(ApiKeyAuthenticationHandler.KeyClaim), out var id) ? id : null;

    public static string? Role(this ClaimsPrincipal user) => user.FindFirstValue(ClaimTypes.Role);
}

public static class AuditLog
{
    /// <summary>Adds an audit event to the context: it is saved (or not) with the change it records.</summary>
    public static AuditEvent Audit(this FineTuneDbContext db, ClaimsPrincipal actor, Guid tenantId, string action,
        string targetType, object targetId, object? data = null)
    {
        var e = new AuditEvent
        {
            TenantId = tenantId, ActorTenantId = actor.TenantId(), ActorKeyId = actor.KeyId(), ActorRole = actor.Role(),
            Action = action, TargetType = targetType, TargetId = targetId.ToString()!,
            Data = data is null ? null : JsonSerializer.Serialize(data, DomainJson.Options),
        };
        db.AuditEvents.Add(e);
        return e;
    }
}
