using System.Security.Claims;
using System.Text.Encodings.Web;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.AspNetCore.Authentication;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Infrastructure;

/// <summary><c>Authorization: Bearer ft_…</c>: looked up by prefix, compared by hash in constant time.</summary>
public sealed class ApiKeyAuthenticationHandler(
    IOptionsMonitor<AuthenticationSchemeOptions> options, ILoggerFactory logger, UrlEncoder encoder, FineTuneDbContext db)
    : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
{
    public const string SchemeName = "ApiKey";
    public const string TenantClaim = "tenant_id", KeyClaim = "key_id";
    public const string WritePolicy = "write";
    private const string FailureKey = "auth_failure";

    protected override async Task<AuthenticateResult> HandleAuthenticateAsync()
    {
        string? header = Request.Headers.Authorization;
        if (string.IsNullOrEmpty(header)) return Fail("Send an API key: Authorization: Bearer <key>.");
        if (!header.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase)) return Fail("Use the Bearer scheme: Authorization: Bearer <key>.");
        var key = header["Bearer ".Length..].Trim();
        if (!ApiKeys.LooksValid(key)) return Fail("The API key is not valid.");

        var prefix = ApiKeys.PrefixOf(key);
        var candidates = await db.ApiKeys.AsNoTracking().Where(k => k.Prefix == prefix).ToListAsync(Context.RequestAborted);
        var match = candidates.FirstOrDefault(k => ApiKeys.Matches(key, k.Hash));
        if (match is null) return Fail("The API key is not valid.");
        if (match.RevokedAt is not null) return Fail("The API key has been revoked.");
        if (match.ExpiresAt <= DateTimeOffset.UtcNow) return Fail("The API key has expired.");

        var identity = new ClaimsIdentity(
        [
            new Claim(TenantClaim, match.TenantId.ToString()),
            new Claim(KeyClaim, match.Id.ToString()),
            new Claim(ClaimTypes.Role, match.Role),
        ], SchemeName, ClaimTypes.NameIdentifier, ClaimTypes.Role);
        return AuthenticateResult.Success(new AuthenticationTicket(new ClaimsPrincipal(identity), SchemeName));
    }

    private AuthenticateResult Fail(string reason)
    {
        Context.Items[FailureKey] = reason;
        return AuthenticateResult.Fail(reason);
    }

    protected override async Task HandleChallengeAsync(AuthenticationProperties properties)
    {
        Response.Headers.WWWAuthenticate = "Bearer";
        var reason = Context.Items[FailureKey] as string ?? "Authentication is required.";
        await TypedResults.Problem(reason, statusCode: 401, title: "Unauthorized").ExecuteAsync(Context);
    }

    protected override Task HandleForbiddenAsync(AuthenticationProperties properties) =>
        TypedResults.Problem("This API key's role may not do this.", statusCode: 403, title: "Forbidden").ExecuteAsync(Context);
}
