using FineTune.Domain.Tenants;

namespace FineTune.Api.Infrastructure;

/// <summary>
/// Who may change service-wide settings such as the base-model registry. Today: an API key with the admin role (of
/// any tenant); the one place to change when a service-operator role exists.
/// </summary>
public static class AdminAuthorization
{
    public static TBuilder RequireServiceAdmin<TBuilder>(this TBuilder builder) where TBuilder : IEndpointConventionBuilder =>
        builder.RequireAuthorization(p => p.RequireRole(Roles.Admin));
}
