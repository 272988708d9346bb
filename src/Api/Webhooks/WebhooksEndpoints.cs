using System.Security.Claims;
using System.Text.Json;
using FineTune.Api.Endpoints;
using FineTune.Api.Infrastructure;
using FineTune.Domain;
using FineTune.Domain.Audit;
using FineTune.Domain.Persistence;
using FineTune.Domain.Webhooks;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Webhooks;

/// <summary>A webhook to register.</summary>
/// <param name="Url">https URL that receives POSTs (private and loopback addresses are refused unless configured).</param>
/// <param name="Events">job.succeeded, job.failed, job.cancelled, alias.moved (default: all).</param>
public sealed record CreateWebhookRequest(string Url, IReadOnlyList<string>? Events = null, string? Description = null, bool Enabled = true);

/// <summary>Fields to change; absent fields stay as they are.</summary>
public sealed record UpdateWebhookRequest(string? Url = null, IReadOnlyList<string>? Events = null, string? Description = null, bool? Enabled = null);

public sealed record WebhookDto(Guid Id, string Url, IReadOnlyList<string> Events, string? Description, bool Enabled,
    DateTimeOffset CreatedAt, DateTimeOffset UpdatedAt)
{
    public static WebhookDto From(Webhook w) => new(w.Id, w.Url, w.Events, w.Description, w.Enabled, w.CreatedAt, w.UpdatedAt);
}

/// <summary>A new webhook; <see cref="Secret"/> (the HMAC key) is shown this once.</summary>
public sealed record CreatedWebhookDto(Guid Id, string Url, IReadOnlyList<string> Events, string? Description, bool Enabled,
    DateTimeOffset CreatedAt, string Secret);

/// <summary>One event for one webhook and its attempts so far.</summary>
/// <param name="Status">pending (waiting for its next attempt), delivered (a 2xx answer) or failed (attempts exhausted).</param>
/// <param name="Payload">The body as sent.</param>
/// <param name="AttemptLog">Each attempt: {attempt, at, statusCode, error, durationMs}.</param>
public sealed record DeliveryDto(Guid Id, Guid WebhookId, Guid EventId, string EventType, string Status, int Attempts,
    DateTimeOffset CreatedAt, DateTimeOffset? NextAttemptAt, DateTimeOffset? DeliveredAt, int? LastStatusCode, string? LastError,
    JsonElement Payload, JsonElement AttemptLog)
{
    public static DeliveryDto From(WebhookDelivery d) => new(d.Id, d.WebhookId, d.EventId, d.EventType, d.Status, d.Attempts, d.CreatedAt,
        d.Status == DeliveryStatus.Pending ? d.NextAttemptAt : null, d.DeliveredAt, d.LastStatusCode, d.LastError,
        JsonDocument.Parse(d.Payload).RootElement.Clone(), JsonDocument.Parse(d.AttemptLog).RootElement.Clone());
}

/// <summary>
/// Per-tenant webhooks: POSTs signed with <c>X-Finetune-Signature: t=&lt;unix&gt;,v1=&lt;hex HMAC-SHA256(secret, t + "." + body)&gt;</c>
/// on job.succeeded, job.failed, job.cancelled and alias.moved, from a durable outbox, with retries and a delivery log.
/// </summary>
public static class WebhooksEndpoints
{
    public static RouteGroupBuilder MapWebhooks(this IEndpointRouteBuilder app)
    {
        var group = app.MapGroup("/v1/webhooks").WithTags("Webhooks").RequireReader();
        group.MapPost("/", Create).RequireWriter().Accepts<CreateWebhookRequest>("application/json")
            .Produces<CreatedWebhookDto>(201).ProducesValidationProblem(422)
            .WithName("CreateWebhook").WithSummary("Register a webhook; the signing secret is in this response only")
            .WithDescription("Each delivery is a POST of the event JSON with headers X-Finetune-Signature (t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\" with the secret>), X-Finetune-Event, X-Finetune-Delivery (dedupe on it: delivery is at least once) and X-Finetune-Attempt. Answer 2xx within the timeout; anything else is retried with exponential backoff.")
            .WithExamples(new CreateWebhookRequest("https://hooks.example.com/finetune", [WebhookEvents.JobSucceeded, WebhookEvents.AliasMoved], "deploy bot"),
                Examples.CreatedWebhook);
        group.MapGet("/", List).WithName("ListWebhooks").WithSummary("The tenant's webhooks").WithExamples(response: new[] { Examples.Webhook });
        group.MapGet("/{id:guid}", Get).WithName("GetWebhook").WithSummary("A webhook").WithExamples(response: Examples.Webhook);
        group.MapPatch("/{id:guid}", Update).RequireWriter().Accepts<UpdateWebhookRequest>("application/json")
            .WithName("UpdateWebhook").WithSummary("Change a webhook's URL, events, description or enabled flag")
            .WithExamples(new UpdateWebhookRequest(Enabled: false), Examples.Webhook with { Enabled = false });
        group.MapDelete("/{id:guid}", Delete).RequireWriter().Produces(204).WithName("DeleteWebhook")
            .WithSummary("Delete a webhook and its delivery log").WithExamples();
        group.MapGet("/{id:guid}/deliveries", Deliveries).WithName("ListWebhookDeliveries")
            .WithSummary("The delivery log, newest first (status = pending | delivered | failed; cursor paging)")
            .WithExamples(response: new Page<DeliveryDto>([Examples.Delivery], null));
        group.MapPost("/{id:guid}/ping", Ping).RequireWriter().Produces<DeliveryDto>(202).WithName("PingWebhook")
            .WithSummary("Queue a signed test event (type ping)").WithExamples(response: Examples.Delivery with { EventType = WebhookEvents.Ping });
        group.MapPost("/{id:guid}/deliveries/{deliveryId:guid}/redeliver", Redeliver).RequireWriter().Produces<DeliveryDto>(202)
            .WithName("RedeliverWebhookDelivery").WithSummary("Send a delivery again (e.g. a failed one) with a fresh set of attempts")
            .WithExamples(response: Examples.Delivery);
        return group;
    }

    private static Dictionary<string, string[]> Validate(string? url, IReadOnlyList<string>? events, string? description, WebhookOptions o)
    {
        var errors = new Dictionary<string, string[]>();
        if (url is not null && OutboundUrlPolicy.Check(url, o) is { } e) errors["url"] = [e];
        if (events is not null)
        {
            if (events.Count == 0) errors["events"] = ["must name at least one event"];
            for (var i = 0; i < events.Count; i++)
                if (!WebhookEvents.All.Contains(events[i]))
                    errors[$"events[{i}]"] = [$"unknown event '{events[i]}'; known: {string.Join(", ", WebhookEvents.All)}"];
        }
        if (description is { Length: > 200 }) errors["description"] = ["must be at most 200 characters"];
        return errors;
    }

    private static async Task<Results<Created<CreatedWebhookDto>, ProblemHttpResult>> Create(HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, IOptions<WebhookOptions> options, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<CreateWebhookRequest>(http, ct);
        if (error is not null) return error;
        var errors = Validate(request!.Url, request.Events, request.Description, options.Value);
        if (errors.Count > 0) return JsonBody.Unprocessable(errors);
        var tenant = user.TenantId();
        if (await db.Webhooks.CountAsync(w => w.TenantId == tenant, ct) >= options.Value.MaxWebhooksPerTenant)
            return JsonBody.Unprocessable("$", $"a tenant may have at most {options.Value.MaxWebhooksPerTenant} webhooks");
        var hook = new Webhook
        {
            TenantId = tenant, Url = request.Url, Secret = WebhookSignature.NewSecret(),
            Events = [.. (request.Events ?? WebhookEvents.All).Distinct()], Description = request.Description, Enabled = request.Enabled,
        };
        db.Webhooks.Add(hook);
        db.Audit(user, tenant, AuditActions.WebhookCreated, "webhook", hook.Id, new { hook.Url, hook.Events });
        await db.SaveChangesAsync(ct);
        return TypedResults.Created($"/v1/webhooks/{hook.Id}",
            new CreatedWebhookDto(hook.Id, hook.Url, hook.Events, hook.Description, hook.Enabled, hook.CreatedAt, hook.Secret));
    }

    private static async Task<Ok<List<WebhookDto>>> List(ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var hooks = await db.Webhooks.AsNoTracking().Where(w => w.TenantId == tenant).OrderBy(w => w.CreatedAt).ToListAsync(ct);
        return TypedResults.Ok(hooks.Select(WebhookDto.From).ToList());
    }

    private static async Task<Results<Ok<WebhookDto>, ProblemHttpResult>> Get(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct) =>
        await Find(db, user, id, ct) is { } w ? TypedResults.Ok(WebhookDto.From(w)) : JsonBody.NotFound($"webhook {id}");

    private static async Task<Results<Ok<WebhookDto>, ProblemHttpResult>> Update(Guid id, HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, IOptions<WebhookOptions> options, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<UpdateWebhookRequest>(http, ct);
        if (error is not null) return error;
        var errors = Validate(request!.Url, request.Events, request.Description, options.Value);
        if (errors.Count > 0) return JsonBody.Unprocessable(errors);
        var tenant = user.TenantId();
        var hook = await db.Webhooks.FirstOrDefaultAsync(w => w.Id == id && w.TenantId == tenant, ct);
        if (hook is null) return JsonBody.NotFound($"webhook {id}");
        if (request.Url is not null) hook.Url = request.Url;
        if (request.Events is not null) hook.Events = [.. request.Events.Distinct()];
        if (request.Description is not null) hook.Description = request.Description;
        if (request.Enabled is { } enabled) hook.Enabled = enabled;
        hook.UpdatedAt = Domain.Jobs.Clock.Now();
        db.Audit(user, tenant, AuditActions.WebhookUpdated, "webhook", hook.Id, request);
        await db.SaveChangesAsync(ct);
        return TypedResults.Ok(WebhookDto.From(hook));
    }

    private static async Task<Results<NoContent, ProblemHttpResult>> Delete(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var hook = await db.Webhooks.FirstOrDefaultAsync(w => w.Id == id && w.TenantId == tenant, ct);
        if (hook is null) return JsonBody.NotFound($"webhook {id}");
        db.Webhooks.Remove(hook);
        db.Audit(user, tenant, AuditActions.WebhookDeleted, "webhook", hook.Id, new { hook.Url });
        await db.SaveChangesAsync(ct);
        return TypedResults.NoContent();
    }

    private static async Task<Results<Ok<Page<DeliveryDto>>, ProblemHttpResult>> Deliveries(Guid id, ClaimsPrincipal user, FineTuneDbContext db,
        string? status, int? limit, string? after, CancellationToken ct)
    {
        if (await Find(db, user, id, ct) is null) return JsonBody.NotFound($"webhook {id}");
        var query = db.WebhookDeliveries.AsNoTracking().Where(d => d.WebhookId == id);
        if (status is not null)
        {
            if (!DeliveryStatus.All.Contains(status)) return FineTunesEndpoints.BadQuery("status", "must be pending, delivered or failed");
            query = query.Where(d => d.Status == status);
        }
        var take = limit ?? 20;
        if (take is < 1 or > 100) return FineTunesEndpoints.BadQuery("limit", "must be between 1 and 100");
        if (after is not null)
        {
            if (!Cursor.TryDecode(after, out var at, out var cursorId)) return FineTunesEndpoints.BadQuery("after", "is not a cursor returned by this API");
            query = query.Where(d => EF.Functions.LessThan(ValueTuple.Create(d.CreatedAt, d.Id), ValueTuple.Create(at, cursorId)));
        }
        var rows = await query.OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).Take(take + 1).ToListAsync(ct);
        var page = rows.Take(take).ToList();
        var next = rows.Count > take ? Cursor.Encode(page[^1].CreatedAt, page[^1].Id) : null;
        return TypedResults.Ok(new Page<DeliveryDto>([.. page.Select(DeliveryDto.From)], next));
    }

    private static async Task<Results<Accepted<DeliveryDto>, ProblemHttpResult>> Ping(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var hook = await Find(db, user, id, ct);
        if (hook is null) return JsonBody.NotFound($"webhook {id}");
        var eventId = Guid.NewGuid();
        var delivery = new WebhookDelivery
        {
            WebhookId = hook.Id, TenantId = hook.TenantId, EventId = eventId, EventType = WebhookEvents.Ping,
            Payload = JsonSerializer.Serialize(new { id = eventId, type = WebhookEvents.Ping, createdAt = Domain.Jobs.Clock.Now(), data = new { webhookId = hook.Id } },
                DomainJson.Options),
        };
        db.WebhookDeliveries.Add(delivery);
        await db.SaveChangesAsync(ct);
        return TypedResults.Accepted($"/v1/webhooks/{hook.Id}/deliveries", DeliveryDto.From(delivery));
    }

    private static async Task<Results<Accepted<DeliveryDto>, ProblemHttpResult>> Redeliver(Guid id, Guid deliveryId, ClaimsPrincipal user,
        FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var delivery = await db.WebhookDeliveries.FirstOrDefaultAsync(d => d.Id == deliveryId && d.WebhookId == id && d.TenantId == tenant, ct);
        if (delivery is null) return JsonBody.NotFound($"delivery {deliveryId} of webhook {id}");
        delivery.Status = DeliveryStatus.Pending;
        delivery.Attempts = 0;
        delivery.NextAttemptAt = Domain.Jobs.Clock.Now();
        delivery.LockedUntil = null;
        await db.SaveChangesAsync(ct);
        return TypedResults.Accepted($"/v1/webhooks/{id}/deliveries", DeliveryDto.From(delivery));
    }

    private static Task<Webhook?> Find(FineTuneDbContext db, ClaimsPrincipal user, Guid id, CancellationToken ct)
    {
        var tenant = user.TenantId();
        return db.Webhooks.AsNoTracking().FirstOrDefaultAsync(w => w.Id == id && w.TenantId == tenant, ct);
    }
}
