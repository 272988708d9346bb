using System.Net.ServerSentEvents;
using System.Runtime.CompilerServices;
using System.Security.Claims;
using FineTune.Api.Infrastructure;
using FineTune.Api.Submission;
using FineTune.Api.Tenancy;
using FineTune.Domain.Audit;
using FineTune.Domain.Dispatch;
using FineTune.Domain.Jobs;
using FineTune.Domain.Persistence;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.AspNetCore.Mvc;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace FineTune.Api.Endpoints;

public static class FineTunesEndpoints
{
    public static RouteGroupBuilder MapFineTunes(this IEndpointRouteBuilder app)
    {
        var group = app.MapGroup("/v1/fine-tunes").WithTags("Fine-tunes").RequireAuthorization()
            .AddEndpointFilter(JobLogScope);
        group.MapPost("/", Create).RequireAuthorization(ApiKeyAuthenticationHandler.WritePolicy)
            .Accepts<CreateFineTuneRequest>("application/json")
            .Produces<JobDto>(StatusCodes.Status202Accepted).Produces<JobDto>(StatusCodes.Status200OK)
            .ProducesValidationProblem(StatusCodes.Status400BadRequest).ProducesValidationProblem(StatusCodes.Status422UnprocessableEntity)
            .ProducesProblem(StatusCodes.Status409Conflict).ProducesProblem(StatusCodes.Status413PayloadTooLarge)
            .ProducesProblem(StatusCodes.Status429TooManyRequests)
            .WithName("CreateFineTune").WithSummary("Submit a fine-tune job")
            .WithDescription("Validates everything (JSON shape, ranges, the model's module shapes, the datasets) before storing the job, then queues it. "
                + "With an Idempotency-Key header, resending the same body returns the same job and a different body answers 409. "
                + "The tenant's quotas apply: a job too large for them (pool, priority, dataset bytes, steps, tokens) answers 422, a tenant over its "
                + "queued-jobs or per-minute limit 429 with its usage; over its running-jobs limit the job is accepted and waits queued.")
            .WithExamples(response: Examples.Job);
        group.MapGet("/", List).WithName("ListFineTunes").WithSummary("List jobs, newest first, with cursor paging")
            .WithExamples(response: new Page<JobDto>([Examples.Job], null));
        group.MapGet("/{id:guid}", Get).WithName("GetFineTune")
            .WithSummary("Get a job; a queued one carries its queue position, estimated start and what it waits for")
            .WithExamples(response: Examples.Job);
        group.MapPost("/{id:guid}/cancel", Cancel).RequireAuthorization(ApiKeyAuthenticationHandler.WritePolicy)
            .WithName("CancelFineTune").WithSummary("Cancel a job")
            .WithDescription("A queued job is cancelled at once (200); a running one is asked to stop (202, cancelRequested=true) and ends as cancelled shortly; a finished one answers 409.")
            .WithExamples(response: Examples.Job with { Status = JobStatus.Cancelled, CancelRequested = true, Queue = null, FinishedAt = Examples.At });
        group.MapGet("/{id:guid}/events", Events).WithName("GetFineTuneEvents")
            .Produces<List<JobEventDto>>(StatusCodes.Status200OK, "application/json", "text/event-stream")
            .WithSummary("A job's events (JSON list, or a live stream with Accept: text/event-stream)")
            .WithExamples(response: new[] { new JobEventDto(7, Examples.At, "running", "Running on gpu-node-3:4121 (attempt 1).", null) });
        group.MapGet("/{id:guid}/metrics", Metrics).WithName("GetFineTuneMetrics").WithSummary("Per-step training metrics")
            .WithExamples(response: new[] { new JobMetricDto(50, 1.82, 2e-4, 10450, 61.3, 1.9, Examples.At) });
        group.MapGet("/{id:guid}/checkpoints", Checkpoints).WithName("GetFineTuneCheckpoints").WithSummary("Checkpoints written so far")
            .WithExamples(response: new[] { new JobCheckpointDto(200, "9a8b7c6d5e4f30211f2e3d4c5b6a79880a1b2c3d4e5f60718293a4b5c6d7e8f9", 25_165_824, Examples.At) });
        return group;
    }

    /// <summary>Puts the job id of /v1/fine-tunes/{id}/… routes into every log line of the request.</summary>
    private static async ValueTask<object?> JobLogScope(EndpointFilterInvocationContext ctx, EndpointFilterDelegate next)
    {
        if (ctx.HttpContext.Request.RouteValues.TryGetValue("id", out var id) && id is not null)
        {
            var log = ctx.HttpContext.RequestServices.GetRequiredService<ILoggerFactory>().CreateLogger("FineTune.Api");
            using (log.BeginScope(new Dictionary<string, object> { ["JobId"] = id }))
                return await next(ctx);
        }
        return await next(ctx);
    }

    /// <summary>Submit a fine-tune job.</summary>
    /// <param name="idempotencyKey">Optional client key (at most 200 characters) that makes resubmission safe.</param>
    private static async Task<Results<Accepted<JobDto>, Ok<JobDto>, ProblemHttpResult>> Create(
        HttpRequest http, ClaimsPrincipal user, SubmissionParser parser, FineTuneDbContext db, IJobDispatcher dispatcher,
        ILoggerFactory loggers, [FromHeader(Name = "Idempotency-Key")] string? idempotencyKey, CancellationToken ct)
    {
        var log = loggers.CreateLogger("FineTune.Api.Submit");
        if (idempotencyKey is not null && (idempotencyKey.Length is 0 or > 200 || idempotencyKey.Any(char.IsControl)))
            return Problem(new(400, "Invalid Idempotency-Key", "Idempotency-Key must be 1 to 200 printable characters.",
                new Dictionary<string, string[]> { ["Idempotency-Key"] = ["must be 1 to 200 printable characters"] }));
        var (body, bodyError) = await parser.ReadBodyAsync(http, ct);
        if (bodyError is not null) return Problem(bodyError);
        var (request, hash, readError) = parser.Read(body!);
        if (readError is not null) return Problem(readError);

        var tenant = user.TenantId();
        if (idempotencyKey is not null && await Replay(db, tenant, idempotencyKey, hash!, ct) is { } replay) return replay;

        var (valid, invalid) = await parser.ValidateAsync(request!, hash!, ct);
        if (invalid is not null) return Problem(invalid);
        var s = valid!;
        var quota = await db.Tenants.AsNoTracking().SingleAsync(t => t.Id == tenant, ct);
        if (QuotaCheck.CheckJob(quota, s) is { } tooLarge) return tooLarge;
        var job = new FineTuneJob
        {
            TenantId = tenant, Model = s.Request.Model, ModelPath = s.ModelPath, TrainingData = s.Request.TrainingData,
            ValidationData = s.Request.ValidationData, Method = s.Request.Method, Hyperparameters = s.Hyperparameters,
            AdapterName = s.Request.AdapterName, Pool = s.Pool, Priority = Priorities.ToInt(s.Priority),
            IdempotencyKey = idempotencyKey, RequestHash = s.RequestHash, Merge = s.Request.Merge,
            ModelUri = s.ModelUri, ModelSha256 = s.ModelSha256,
            DatasetSha256 = s.Training?.Sha256, TrainingExamples = s.Training?.Examples, DatasetTokens = s.Training?.Tokens,
            DatasetTruncated = s.Training?.Truncated, DatasetSkipped = s.Training?.Skipped, ValidationSha256 = s.Validation?.Sha256,
            ValidationExamples = s.Validation?.Examples, ValidationTokens = s.Validation?.Tokens,
            EstimatedTokens = s.Estimate?.Tokens, EstimatedSeconds = s.Estimate?.Seconds,
        };
        job.Created();
        // The tenant's submits are serialised (an advisory lock for this transaction) so that the queue and rate
        // limits are exact under concurrent submits.
        await using (var tx = await db.Database.BeginTransactionAsync(ct))
        {
            await db.Database.ExecuteSqlAsync($"SELECT pg_advisory_xact_lock(hashtextextended({"submit:" + tenant}, 0))", ct);
            if (await QuotaCheck.CheckUsageAsync(db, http.HttpContext.Response, quota, ct) is { } overQuota) return overQuota;
            db.Jobs.Add(job);
            db.Audit(user, tenant, AuditActions.JobCreated, "job", job.Id, new { job.AdapterName, job.Pool, priority = s.Priority, method = job.Method.Type });
            try
            {
                await db.SaveChangesAsync(ct);
                await tx.CommitAsync(ct);
            }
            catch (DbUpdateException e) when (idempotencyKey is not null
                && e.InnerException is PostgresException { SqlState: PostgresErrorCodes.UniqueViolation })
            {
                // A concurrent submit with the same key won the insert: answer as a replay of it.
                await tx.RollbackAsync(ct);
                db.ChangeTracker.Clear();
                if (await Replay(db, tenant, idempotencyKey, hash!, ct) is { } raced) return raced;
                throw;
            }
        }
        using (log.BeginScope(new Dictionary<string, object> { ["JobId"] = job.Id }))
        {
            log.LogInformation("Job {JobId} queued: {Method} on {Model}, pool {Pool}", job.Id, job.Method.Type, job.Model, job.Pool);
            try
            {
                await dispatcher.EnqueueAsync(job.Id, job.Pool, job.Priority, ct);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                // The job is stored as queued; the dispatcher's reconciler schedules queued jobs that lack a trigger.
                log.LogWarning(e, "Enqueueing job {JobId} failed; it stays queued for the reconciler", job.Id);
            }
        }
        return TypedResults.Accepted($"/v1/fine-tunes/{job.Id}", JobDto.From(job));
    }

    private static async Task<Results<Accepted<JobDto>, Ok<JobDto>, ProblemHttpResult>?> Replay(
        FineTuneDbContext db, Guid tenant, string key, string hash, CancellationToken ct)
    {
        var existing = await db.Jobs.AsNoTracking().FirstOrDefaultAsync(j => j.TenantId == tenant && j.IdempotencyKey == key, ct);
        if (existing is null) return null;
        if (existing.RequestHash != hash)
            return TypedResults.Problem("This Idempotency-Key was already used with a different request body.",
                statusCode: 409, title: "Idempotency-Key reused", extensions: new Dictionary<string, object?> { ["jobId"] = existing.Id });
        return TypedResults.Ok(JobDto.From(existing));
    }

    private static async Task<Results<Ok<Page<JobDto>>, ProblemHttpResult>> List(
        ClaimsPrincipal user, FineTuneDbContext db, NpgsqlDataSource dataSource, string? status, int? limit, string? after, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var query = db.Jobs.AsNoTracking().Where(j => j.TenantId == tenant);
        if (status is not null)
        {
            if (!JobTransitions.TryParse(status, out var st))
                return BadQuery("status", "must be one of: queued, running, succeeded, failed, cancelled");
            query = query.Where(j => j.Status == st);
        }
        var take = limit ?? 20;
        if (take is < 1 or > 100) return BadQuery("limit", "must be between 1 and 100");
        if (after is not null)
        {
            if (!Cursor.TryDecode(after, out var at, out var id)) return BadQuery("after", "is not a cursor returned by this API");
            query = query.Where(j => EF.Functions.LessThan(ValueTuple.Create(j.CreatedAt, j.Id), ValueTuple.Create(at, id)));
        }
        var rows = await query.OrderByDescending(j => j.CreatedAt).ThenByDescending(j => j.Id).Take(take + 1).ToListAsync(ct);
        var page = rows.Take(take).ToList();
        var next = rows.Count > take ? Cursor.Encode(page[^1].CreatedAt, page[^1].Id) : null;
        return TypedResults.Ok(new Page<JobDto>(await WithQueueAsync(page, dataSource, ct), next));
    }

    private static async Task<Results<Ok<JobDto>, ProblemHttpResult>> Get(Guid id, ClaimsPrincipal user, FineTuneDbContext db,
        NpgsqlDataSource dataSource, CancellationToken ct) =>
        await Find(db, user, id, ct) is { } job ? TypedResults.Ok((await WithQueueAsync([job], dataSource, ct))[0]) : NotFound(id);

    /// <summary>DTOs, with the queue position and estimated start of the queued ones (one ranking per pool).</summary>
    private static async Task<List<JobDto>> WithQueueAsync(IReadOnlyList<FineTuneJob> jobs, NpgsqlDataSource dataSource, CancellationToken ct)
    {
        var pools = jobs.Where(j => j.Status == JobStatus.Queued).Select(j => j.Pool).ToList();
        var queue = pools.Count == 0 ? [] : await FairQueue.EstimateAsync(dataSource, pools, ct);
        return [.. jobs.Select(j => JobDto.From(j) with { Queue = queue.GetValueOrDefault(j.Id) })];
    }

    private static async Task<Results<Ok<JobDto>, Accepted<JobDto>, ProblemHttpResult>> Cancel(
        Guid id, ClaimsPrincipal user, FineTuneDbContext db, IJobDispatcher dispatcher, ILoggerFactory loggers, CancellationToken ct)
    {
        var tenant = user.TenantId();
        for (var attempt = 0; ; attempt++)
        {
            db.ChangeTracker.Clear();
            var job = await db.Jobs.FirstOrDefaultAsync(j => j.Id == id && j.TenantId == tenant, ct);
            if (job is null) return NotFound(id);
            if (job.IsFinished)
                return TypedResults.Problem($"The job is already {job.Status.ToWire()}.", statusCode: 409, title: "Job already finished");
            var running = job.Status == JobStatus.Running;
            if (running) job.RequestCancel();
            else job.Cancel("Cancelled by request before it started");
            db.Audit(user, tenant, AuditActions.JobCancelled, "job", job.Id, new { wasRunning = running });
            try
            {
                await db.SaveChangesAsync(ct);
            }
            catch (DbUpdateConcurrencyException) when (attempt < 10)
            {
                continue; // the runner moved the job (claimed it, heart-beat): decide again on the fresh row
            }
            if (!running) return TypedResults.Ok(JobDto.From(job));
            try
            {
                // The job runs under the Quartz firing that claimed it (see FairQueue), not necessarily its own key.
                await dispatcher.InterruptAsync(job.DispatchKey ?? job.Id, ct);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                // The flag is stored; the runner also sees it at its next heartbeat.
                loggers.CreateLogger("FineTune.Api.Cancel").LogWarning(e, "Interrupting job {JobId} failed", job.Id);
            }
            return TypedResults.Accepted($"/v1/fine-tunes/{job.Id}", JobDto.From(job));
        }
    }

    private static async Task<Results<Ok<List<JobEventDto>>, ServerSentEventsResult<JobEventDto>, ProblemHttpResult>> Events(
        Guid id, HttpContext http, ClaimsPrincipal user, IDbContextFactory<FineTuneDbContext> dbs, FineTuneDbContext db,
        long? after, CancellationToken ct)
    {
        if (await Find(db, user, id, ct) is null) return NotFound(id);
        var from = after ?? (long.TryParse(http.Request.Headers["Last-Event-ID"], out var last) ? last : 0);
        var wantsStream = http.Request.Headers.Accept.Any(a => a?.Contains("text/event-stream", StringComparison.OrdinalIgnoreCase) == true);
        if (wantsStream) return TypedResults.ServerSentEvents(Stream(dbs, id, from, http.RequestAborted));
        var events = await db.JobEvents.AsNoTracking().Where(e => e.JobId == id && e.Id > from).OrderBy(e => e.Id).ToListAsync(ct);
        return TypedResults.Ok(events.Select(JobEventDto.From).ToList());
    }

    /// <summary>Polls once a second; ends after the job finished and its last events went out, or when the client leaves.</summary>
    private static async IAsyncEnumerable<SseItem<JobEventDto>> Stream(IDbContextFactory<FineTuneDbContext> dbs, Guid id, long after,
        [EnumeratorCancellation] CancellationToken ct)
    {
        while (!ct.IsCancellationRequested)
        {
            List<JobEvent> batch;
            bool finished;
            await using (var db = await dbs.CreateDbContextAsync(ct))
            {
                // Status first: events committed before a finishing transition are then surely in the batch below.
                var status = await db.Jobs.Where(j => j.Id == id).Select(j => (JobStatus?)j.Status).FirstOrDefaultAsync(ct);
                finished = status is null or JobStatus.Succeeded or JobStatus.Failed or JobStatus.Cancelled;
                batch = await db.JobEvents.AsNoTracking().Where(e => e.JobId == id && e.Id > after).OrderBy(e => e.Id).Take(500).ToListAsync(ct);
            }
            foreach (var e in batch)
            {
                after = e.Id;
                yield return new SseItem<JobEventDto>(JobEventDto.From(e), e.Type) { EventId = e.Id.ToString() };
            }
            if (finished && batch.Count < 500) yield break;
            if (batch.Count < 500)
            {
                try { await Task.Delay(TimeSpan.FromSeconds(1), ct); }
                catch (OperationCanceledException) { yield break; }
            }
        }
    }

    private static async Task<Results<Ok<List<JobMetricDto>>, ProblemHttpResult>> Metrics(
        Guid id, ClaimsPrincipal user, FineTuneDbContext db, int? afterStep, CancellationToken ct)
    {
        if (await Find(db, user, id, ct) is null) return NotFound(id);
        var from = afterStep ?? -1;
        var rows = await db.JobMetrics.AsNoTracking().Where(m => m.JobId == id && m.Step > from).OrderBy(m => m.Step).Take(10_000).ToListAsync(ct);
        return TypedResults.Ok(rows.Select(JobMetricDto.From).ToList());
    }

    private static async Task<Results<Ok<List<JobCheckpointDto>>, ProblemHttpResult>> Checkpoints(
        Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        if (await Find(db, user, id, ct) is null) return NotFound(id);
        var rows = await db.JobCheckpoints.AsNoTracking().Where(c => c.JobId == id).OrderBy(c => c.Step).ToListAsync(ct);
        return TypedResults.Ok(rows.Select(JobCheckpointDto.From).ToList());
    }

    private static Task<FineTuneJob?> Find(FineTuneDbContext db, ClaimsPrincipal user, Guid id, CancellationToken ct)
    {
        var tenant = user.TenantId();
        return db.Jobs.AsNoTracking().FirstOrDefaultAsync(j => j.Id == id && j.TenantId == tenant, ct);
    }

    internal static ProblemHttpResult NotFound(Guid id) =>
        TypedResults.Problem($"No fine-tune job {id}.", statusCode: 404, title: "Not found");

    internal static ProblemHttpResult BadQuery(string field, string message) =>
        TypedResults.Problem(new HttpValidationProblemDetails(new Dictionary<string, string[]> { [field] = [message] })
        {
            Status = 400, Title = "Invalid query", Detail = $"{field}: {message}",
        });

    internal static ProblemHttpResult Problem(SubmissionError e)
    {
        var problem = new HttpValidationProblemDetails(e.Errors) { Status = e.Status, Title = e.Title, Detail = e.Detail };
        foreach (var (k, v) in e.Extensions ?? new Dictionary<string, object?>()) problem.Extensions[k] = v;
        return TypedResults.Problem(problem);
    }
}
