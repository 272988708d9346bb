using System.IO.Compression;
using System.IO.Pipelines;
using System.Security.Claims;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using FineTune.Api.Infrastructure;
using FineTune.Api.Tenancy;
using FineTune.Domain.Adapters;
using FineTune.Domain.Audit;
using FineTune.Domain.Persistence;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;
using Microsoft.Net.Http.Headers;

namespace FineTune.Api.Endpoints;

/// <summary>
/// The per-task registry: task (a job's adapterName) → versions v1, v2, … with immutable files; aliases that move;
/// tags; lineage; downloads (zip of the whole folder, the PEFT-native part or the LoRA export; single files with
/// Range and ETag); soft delete, restore, purge. Every query is scoped to the caller's tenant: another tenant's
/// adapter, task or alias answers 404.
/// </summary>
public static class AdaptersEndpoints
{
    public static RouteGroupBuilder MapAdapters(this IEndpointRouteBuilder app)
    {
        var group = app.MapGroup("/v1/adapters").WithTags("Adapters").RequireReader();
        group.MapGet("/", List).WithName("ListAdapters")
            .WithSummary("Search adapter versions, newest first: by task, base model, method, tags, a metric range")
            .WithDescription("task (or name), baseModel, method, tag (repeat: all must match), metric = finalLoss | finalValidationLoss with min/max, includeDeleted; cursor paging.")
            .WithExamples(response: new Page<AdapterDto>([Examples.Adapter], null));
        group.MapGet("/tasks", ListTasks).WithName("ListAdapterTasks").WithSummary("The tenant's tasks: version counts, latest version, aliases")
            .WithExamples(response: new[] { Examples.Task });
        group.MapGet("/tasks/{task}", GetTask).WithName("GetAdapterTask").WithSummary("A task: its aliases and versions (newest first)")
            .WithExamples(response: new TaskDetailDto("support-bot", [Examples.Alias], [Examples.Adapter]));
        group.MapPut("/tasks/{task}/aliases/{alias}", SetAlias).RequireWriter().Accepts<SetAliasRequest>("application/json")
            .WithName("SetAdapterAlias").WithSummary("Point an alias (production, staging…) at a version; audited, and an alias.moved webhook")
            .WithExamples(new SetAliasRequest(2), Examples.Alias);
        group.MapDelete("/tasks/{task}/aliases/{alias}", DeleteAlias).RequireWriter().WithName("DeleteAdapterAlias")
            .WithSummary("Remove an alias (audited)").WithExamples(response: Examples.Alias);

        // Reads answer by id and by reference (task@alias, task@v3 or task@3): serving systems pull task@production.
        group.MapGet("/{id:guid}", (Guid id, ClaimsPrincipal u, FineTuneDbContext db, CancellationToken ct) => Get(new(id), u, db, ct))
            .WithName("GetAdapter").WithSummary("An adapter version with its lineage, files, tags and aliases")
            .WithExamples(response: Examples.Adapter);
        group.MapGet("/{task}@{reference}", (string task, string reference, ClaimsPrincipal u, FineTuneDbContext db, CancellationToken ct) =>
                Get(new(task, reference), u, db, ct))
            .WithName("GetAdapterByReference").WithSummary("Resolve task@alias or task@version (v3 or 3) to a version")
            .WithExamples(response: Examples.Adapter);
        group.MapGet("/{id:guid}/download", (Guid id, string? part, HttpContext h, ClaimsPrincipal u, FineTuneDbContext db,
                IOptions<StorageOptions> s, CancellationToken ct) => Download(new(id), part, h, u, db, s, ct))
            .Produces(200, contentType: "application/zip").Produces(304).ProducesProblem(410)
            .WithName("DownloadAdapter").WithSummary("Download a zip: part = all (default), peft (the native folder) or lora (the LoRA export at the zip's root)")
            .WithDescription("ETag (weak) and If-None-Match are supported; for byte ranges download single files.")
            .WithExamples();
        group.MapGet("/{task}@{reference}/download", (string task, string reference, string? part, HttpContext h, ClaimsPrincipal u,
                FineTuneDbContext db, IOptions<StorageOptions> s, CancellationToken ct) => Download(new(task, reference), part, h, u, db, s, ct))
            .Produces(200, contentType: "application/zip").Produces(304).ProducesProblem(410)
            .WithName("DownloadAdapterByReference").WithSummary("Download task@alias as a zip (part = all, peft or lora)").WithExamples();
        group.MapGet("/{id:guid}/files/{**path}", (Guid id, string path, ClaimsPrincipal u, FineTuneDbContext db, IOptions<StorageOptions> s,
                HttpContext h, CancellationToken ct) => DownloadFile(new(id), path, u, db, s, h, ct))
            .Produces(200, contentType: "application/octet-stream").Produces(206).Produces(304).Produces(416).ProducesProblem(410)
            .WithName("DownloadAdapterFile")
            .WithSummary("Download one file (e.g. lora/adapter_model.safetensors) with Range, ETag = its sha256, If-None-Match, If-Range")
            .WithExamples();
        group.MapGet("/{task}@{reference}/files/{**path}", (string task, string reference, string path, ClaimsPrincipal u, FineTuneDbContext db,
                IOptions<StorageOptions> s, HttpContext h, CancellationToken ct) => DownloadFile(new(task, reference), path, u, db, s, h, ct))
            .Produces(200, contentType: "application/octet-stream").Produces(206).Produces(304).Produces(416).ProducesProblem(410)
            .WithName("DownloadAdapterFileByReference").WithSummary("Download one file of task@alias (Range, ETag)").WithExamples();

        // Changes name a version by id: an alias is a moving target.
        group.MapPut("/{id:guid}/tags", SetTags).RequireWriter().Accepts<SetTagsRequest>("application/json")
            .WithName("SetAdapterTags").WithSummary("Replace a version's tags (audited)")
            .WithExamples(new SetTagsRequest(["reviewed", "eval:gsm8k"]), Examples.Adapter);
        group.MapDelete("/{id:guid}", Delete).RequireWriter().ProducesProblem(409).WithName("DeleteAdapter")
            .WithSummary("Soft-delete a version (hidden from search, downloads 410); refused while an alias points at it")
            .WithExamples(response: Examples.Adapter with { DeletedAt = Examples.At });
        group.MapPost("/{id:guid}/restore", Restore).RequireWriter().ProducesProblem(409).WithName("RestoreAdapter")
            .WithSummary("Undo a soft delete (not after a purge)").WithExamples(response: Examples.Adapter);
        group.MapPost("/{id:guid}/purge", Purge).RequireWriter().ProducesProblem(409).WithName("PurgeAdapter")
            .WithSummary("Remove a soft-deleted version's files for good (the record stays; its version number is never reused)")
            .WithExamples(response: Examples.Adapter with { DeletedAt = Examples.At, PurgedAt = Examples.At });
        return group;
    }

    /// <summary>A version named by id, or by task and reference (alias, v3 or 3).</summary>
    public readonly record struct AdapterRef(Guid? Id, string? Task, string? Reference)
    {
        public AdapterRef(Guid id) : this(id, null, null) { }
        public AdapterRef(string task, string reference) : this(null, task, reference) { }
        public override string ToString() => Id?.ToString() ?? $"{Task}@{Reference}";
    }

    private static async Task<Results<Ok<Page<AdapterDto>>, ProblemHttpResult>> List(
        ClaimsPrincipal user, FineTuneDbContext db, string? task, string? name, string? baseModel, string? method, string[]? tag,
        string? metric, double? min, double? max, bool? includeDeleted, int? limit, string? after, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var query = db.Adapters.AsNoTracking().Where(a => a.TenantId == tenant);
        if ((task ?? name) is { } t) query = query.Where(a => a.Name == t);
        if (baseModel is not null) query = query.Where(a => a.BaseModel == baseModel || a.BaseModelSha256 == baseModel);
        if (method is not null) query = query.Where(a => a.MethodType == method);
        foreach (var one in tag ?? []) query = query.Where(a => a.Tags.Contains(one));
        if (includeDeleted != true) query = query.Where(a => a.DeletedAt == null);
        if (metric is not null || min is not null || max is not null)
        {
            switch (metric)
            {
                case "finalLoss":
                    if (min is not null) query = query.Where(a => a.FinalLoss >= min);
                    if (max is not null) query = query.Where(a => a.FinalLoss <= max);
                    break;
                case "finalValidationLoss":
                    if (min is not null) query = query.Where(a => a.FinalValidationLoss >= min);
                    if (max is not null) query = query.Where(a => a.FinalValidationLoss <= max);
                    break;
                default:
                    return FineTunesEndpoints.BadQuery("metric", "must be finalLoss or finalValidationLoss (with min and/or max)");
            }
        }
        var take = limit ?? 20;
        if (take is < 1 or > 100) return FineTunesEndpoints.BadQuery("limit", "must be between 1 and 100");
        if (after is not null)
        {
            if (!Cursor.TryDecode(after, out var at, out var id)) return FineTunesEndpoints.BadQuery("after", "is not a cursor returned by this API");
            query = query.Where(a => EF.Functions.LessThan(ValueTuple.Create(a.CreatedAt, a.Id), ValueTuple.Create(at, id)));
        }
        var rows = await query.OrderByDescending(a => a.CreatedAt).ThenByDescending(a => a.Id).Take(take + 1).ToListAsync(ct);
        var page = rows.Take(take).ToList();
        var aliases = await AliasesOfAsync(db, tenant, page.Select(a => a.Id), ct);
        var next = rows.Count > take ? Cursor.Encode(page[^1].CreatedAt, page[^1].Id) : null;
        return TypedResults.Ok(new Page<AdapterDto>([.. page.Select(a => AdapterDto.From(a, aliases[a.Id]))], next));
    }

    private static async Task<Ok<List<TaskDto>>> ListTasks(ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var tasks = await db.Adapters.AsNoTracking().Where(a => a.TenantId == tenant)
            .GroupBy(a => a.Name)
            .Select(g => new
            {
                Task = g.Key,
                Versions = g.Count(a => a.DeletedAt == null),
                Latest = g.Where(a => a.DeletedAt == null).Max(a => (int?)a.Version),
                Last = g.Max(a => a.CreatedAt),
            })
            .OrderBy(x => x.Task).Take(1000).ToListAsync(ct);
        var aliases = await db.AdapterAliases.AsNoTracking().Where(a => a.TenantId == tenant).ToListAsync(ct);
        return TypedResults.Ok(tasks.Select(t => new TaskDto(t.Task, t.Versions, t.Latest,
            aliases.Where(a => a.Task == t.Task).OrderBy(a => a.Alias, StringComparer.Ordinal).ToDictionary(a => a.Alias, a => a.Version), t.Last)).ToList());
    }

    private static async Task<Results<Ok<TaskDetailDto>, ProblemHttpResult>> GetTask(string task, ClaimsPrincipal user,
        FineTuneDbContext db, bool? includeDeleted, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var versions = await db.Adapters.AsNoTracking().Where(a => a.TenantId == tenant && a.Name == task)
            .OrderByDescending(a => a.Version).Take(1000).ToListAsync(ct);
        if (versions.Count == 0) return JsonBody.NotFound($"task '{task}'");
        var aliases = await db.AdapterAliases.AsNoTracking().Where(a => a.TenantId == tenant && a.Task == task)
            .OrderBy(a => a.Alias).ToListAsync(ct);
        return TypedResults.Ok(new TaskDetailDto(task, [.. aliases.Select(AliasDto.From)],
            [.. versions.Where(v => includeDeleted == true || v.DeletedAt is null)
                .Select(v => AdapterDto.From(v, [.. aliases.Where(a => a.AdapterId == v.Id).Select(a => a.Alias)]))]));
    }

    private static async Task<Results<Ok<AliasDto>, ProblemHttpResult>> SetAlias(string task, string alias, HttpRequest http,
        ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<SetAliasRequest>(http, ct);
        if (error is not null) return error;
        if (!Names.Slug().IsMatch(alias) || Names.VersionReference().IsMatch(alias))
            return JsonBody.Unprocessable("alias", "must match ^[a-z0-9][a-z0-9._-]{0,63}$ and not look like a version (v3, 3)");
        var tenant = user.TenantId();
        await using var tx = await db.Database.BeginTransactionAsync(ct);
        // The target row is locked: a concurrent delete of it waits, then sees the alias and refuses.
        var target = await db.Adapters.FromSql($"""
            SELECT * FROM adapters WHERE tenant_id = {tenant} AND name = {task} AND version = {request!.Version} FOR UPDATE
            """).FirstOrDefaultAsync(ct);
        if (target is null) return JsonBody.NotFound($"version {request.Version} of task '{task}'");
        if (target.DeletedAt is not null)
            return JsonBody.Conflict($"{task}@v{target.Version} is deleted; restore it first.", "Version deleted");
        var existing = await db.AdapterAliases.FirstOrDefaultAsync(a => a.TenantId == tenant && a.Task == task && a.Alias == alias, ct);
        var from = existing?.Version;
        if (existing is null)
        {
            existing = new AdapterAlias { TenantId = tenant, Task = task, Alias = alias };
            db.AdapterAliases.Add(existing);
        }
        existing.AdapterId = target.Id;
        existing.Version = target.Version;
        existing.UpdatedAt = Domain.Jobs.Clock.Now();
        existing.UpdatedBy = user.KeyId();
        if (from != target.Version)
            db.Audit(user, tenant, AuditActions.AliasMoved, "alias", $"{task}@{alias}", new { task, alias, fromVersion = from, toVersion = target.Version, adapterId = target.Id });
        await db.SaveChangesAsync(ct);
        await tx.CommitAsync(ct);
        return TypedResults.Ok(AliasDto.From(existing));
    }

    private static async Task<Results<Ok<AliasDto>, ProblemHttpResult>> DeleteAlias(string task, string alias, ClaimsPrincipal user,
        FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var existing = await db.AdapterAliases.FirstOrDefaultAsync(a => a.TenantId == tenant && a.Task == task && a.Alias == alias, ct);
        if (existing is null) return JsonBody.NotFound($"alias '{alias}' of task '{task}'");
        db.AdapterAliases.Remove(existing);
        db.Audit(user, tenant, AuditActions.AliasDeleted, "alias", $"{task}@{alias}", new { task, alias, version = existing.Version });
        await db.SaveChangesAsync(ct);
        return TypedResults.Ok(AliasDto.From(existing));
    }

    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> Get(AdapterRef r, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var (adapter, problem) = await ResolveAsync(db, user.TenantId(), r, ct);
        if (adapter is null) return problem!;
        return TypedResults.Ok(AdapterDto.From(adapter, (await AliasesOfAsync(db, adapter.TenantId, [adapter.Id], ct))[adapter.Id]));
    }

    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> SetTags(Guid id, HttpRequest http, ClaimsPrincipal user,
        FineTuneDbContext db, CancellationToken ct)
    {
        var (request, error) = await JsonBody.ReadAsync<SetTagsRequest>(http, ct);
        if (error is not null) return error;
        var tags = request!.Tags.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
        if (tags.Count > 32) return JsonBody.Unprocessable("tags", "at most 32 tags");
        for (var i = 0; i < request.Tags.Count; i++)
            if (!Names.Tag().IsMatch(request.Tags[i]))
                return JsonBody.Unprocessable($"tags[{i}]", "must match ^[a-z0-9][a-z0-9._:-]{0,63}$");
        var tenant = user.TenantId();
        var adapter = await db.Adapters.FirstOrDefaultAsync(a => a.Id == id && a.TenantId == tenant, ct);
        if (adapter is null) return JsonBody.NotFound($"adapter {id}");
        var before = adapter.Tags.ToList();
        adapter.Tags = tags;
        db.Audit(user, tenant, AuditActions.AdapterTagsChanged, "adapter", adapter.Id, new { before, after = tags });
        await db.SaveChangesAsync(ct);
        return TypedResults.Ok(AdapterDto.From(adapter, (await AliasesOfAsync(db, tenant, [adapter.Id], ct))[adapter.Id]));
    }

    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> Delete(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        await using var tx = await db.Database.BeginTransactionAsync(ct);
        var adapter = await db.Adapters.FromSql($"SELECT * FROM adapters WHERE id = {id} AND tenant_id = {tenant} FOR UPDATE").FirstOrDefaultAsync(ct);
        if (adapter is null) return JsonBody.NotFound($"adapter {id}");
        var aliases = await db.AdapterAliases.Where(a => a.AdapterId == id).Select(a => a.Alias).ToListAsync(ct);
        if (aliases.Count > 0)
            return JsonBody.Conflict($"{adapter.Name}@v{adapter.Version} is the target of alias(es) {string.Join(", ", aliases)}; move them first.",
                "Version is aliased", new Dictionary<string, object?> { ["aliases"] = aliases });
        if (adapter.DeletedAt is null)
        {
            adapter.DeletedAt = Domain.Jobs.Clock.Now();
            db.Audit(user, tenant, AuditActions.AdapterDeleted, "adapter", adapter.Id, new { task = adapter.Name, adapter.Version });
            await db.SaveChangesAsync(ct);
        }
        await tx.CommitAsync(ct);
        return TypedResults.Ok(AdapterDto.From(adapter, []));
    }

    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> Restore(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var adapter = await db.Adapters.FirstOrDefaultAsync(a => a.Id == id && a.TenantId == tenant, ct);
        if (adapter is null) return JsonBody.NotFound($"adapter {id}");
        if (adapter.PurgedAt is not null) return JsonBody.Conflict("The version was purged: its files are gone.", "Version purged");
        if (adapter.DeletedAt is not null)
        {
            adapter.DeletedAt = null;
            db.Audit(user, tenant, AuditActions.AdapterRestored, "adapter", adapter.Id, new { task = adapter.Name, adapter.Version });
            await db.SaveChangesAsync(ct);
        }
        return TypedResults.Ok(AdapterDto.From(adapter, (await AliasesOfAsync(db, tenant, [adapter.Id], ct))[adapter.Id]));
    }

    /// <summary>Files first, then the record: a crash in between leaves a version that a second purge finishes.</summary>
    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> Purge(Guid id, ClaimsPrincipal user, FineTuneDbContext db,
        IOptions<StorageOptions> storage, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var adapter = await db.Adapters.FirstOrDefaultAsync(a => a.Id == id && a.TenantId == tenant, ct);
        if (adapter is null) return JsonBody.NotFound($"adapter {id}");
        if (adapter.DeletedAt is null) return JsonBody.Conflict("Delete the version first (DELETE /v1/adapters/{id}), then purge it.", "Version not deleted");
        if (adapter.PurgedAt is null)
        {
            var root = storage.Value.EffectiveArtifactRoot;
            var folder = Path.GetFullPath(Path.Combine(root, adapter.Path));
            // Only ever inside the artifact root, and never the root itself.
            if (!Paths.IsUnder(folder, root) || folder == Path.TrimEndingDirectorySeparator(root))
                return JsonBody.Conflict("The version's folder is outside the artifact root; it was left alone.", "Unsafe path");
            if (Directory.Exists(folder)) Directory.Delete(folder, recursive: true);
            adapter.PurgedAt = Domain.Jobs.Clock.Now();
            db.Audit(user, tenant, AuditActions.AdapterPurged, "adapter", adapter.Id,
                new { task = adapter.Name, adapter.Version, files = adapter.Files.Count, bytes = adapter.SizeBytes });
            await db.SaveChangesAsync(ct);
        }
        return TypedResults.Ok(AdapterDto.From(adapter, []));
    }

    /// <summary>A zip of the version's recorded files (each confined to the folder and checked against its recorded
    /// size before the first byte goes out): all, the PEFT-native part (everything but lora/), or the LoRA export
    /// (lora/, at the zip's root so that it unpacks into a loadable folder).</summary>
    private static async Task<Results<EmptyHttpResult, StatusCodeHttpResult, ProblemHttpResult>> Download(AdapterRef r, string? part,
        HttpContext http, ClaimsPrincipal user, FineTuneDbContext db, IOptions<StorageOptions> storage, CancellationToken ct)
    {
        part ??= "all";
        if (part is not ("all" or "peft" or "lora")) return FineTunesEndpoints.BadQuery("part", "must be all, peft or lora");
        var (adapter, problem) = await ResolveAsync(db, user.TenantId(), r, ct);
        if (adapter is null) return problem!;
        if (Gone(adapter) is { } gone) return gone;
        var selected = adapter.Files
            .Where(f => part == "all" || (part == "lora") == f.Path.StartsWith("lora/", StringComparison.Ordinal))
            .Select(f => (File: f, Entry: part == "lora" ? f.Path["lora/".Length..] : f.Path)).ToList();
        if (selected.Count == 0) return JsonBody.NotFound($"'{part}' files in {adapter.Name}@v{adapter.Version}");
        var (files, unavailable) = Locate(adapter, selected.Select(s => s.File), storage.Value);
        if (unavailable is not null) return unavailable;

        // Content is immutable: the tag is a digest of what goes in. Weak, because the zip's bytes depend on the
        // compressor; the files inside are what it vouches for.
        var tag = new EntityTagHeaderValue($"\"{Digest($"{adapter.Id}:{part}:" + string.Join(",", selected.Select(s => $"{s.Entry}={s.File.Sha256}")))}\"", isWeak: true);
        http.Response.Headers.ETag = tag.ToString();
        if (EntityTagHeaderValue.TryParseList([.. http.Request.Headers.IfNoneMatch.OfType<string>()], out var inm) && inm.Any(t => t.Compare(tag, useStrongComparison: false) || t == EntityTagHeaderValue.Any))
            return TypedResults.StatusCode(StatusCodes.Status304NotModified);

        http.Response.ContentType = "application/zip";
        var suffix = part == "all" ? "" : "-" + part;
        // Task names are [a-z0-9._-]: safe inside quotes as they are.
        http.Response.Headers.ContentDisposition = $"attachment; filename=\"{adapter.Name}-v{adapter.Version}{suffix}.zip\"";
        // ZipArchive writes synchronously, which the server forbids on the response: the zip is written on a
        // worker thread into a bounded pipe, and the request copies the pipe out asynchronously (back-pressure
        // keeps memory at the pipe's size whatever the adapter's).
        var pipe = new Pipe(new PipeOptions(pauseWriterThreshold: 1 << 20, resumeWriterThreshold: 1 << 19));
        var entries = selected.Select((s, i) => (s.Entry, files[i])).ToList();
        var stamp = adapter.CreatedAt;
        var producer = Task.Run(async () =>
        {
            try
            {
                await using (var output = pipe.Writer.AsStream(leaveOpen: true))
                using (var zip = new ZipArchive(output, ZipArchiveMode.Create, leaveOpen: true))
                    foreach (var (entry, full) in entries)
                    {
                        // safetensors are dense floats: compression buys little and costs CPU on every download.
                        var level = entry.EndsWith(".json", StringComparison.Ordinal) ? CompressionLevel.Fastest : CompressionLevel.NoCompression;
                        var zipEntry = zip.CreateEntry(entry, level);
                        zipEntry.LastWriteTime = stamp;
                        await using var target = zipEntry.Open();
                        await using var source = File.OpenRead(full);
                        await source.CopyToAsync(target, ct);
                    }
                await pipe.Writer.CompleteAsync();
            }
            catch (Exception e)
            {
                await pipe.Writer.CompleteAsync(e);
            }
        }, ct);
        try
        {
            await pipe.Reader.CopyToAsync(http.Response.Body, ct);
        }
        finally
        {
            await pipe.Reader.CompleteAsync(); // a client that left unblocks the producer
            await producer;
        }
        return TypedResults.Empty;
    }

    /// <summary>One recorded file, served by ASP.NET's file result: Range (206/416), If-Range, If-None-Match (304)
    /// against a strong ETag that is the file's sha256, and a Repr-Digest header (RFC 9530) to verify the whole file.</summary>
    private static async Task<Results<PhysicalFileHttpResult, ProblemHttpResult>> DownloadFile(AdapterRef r, string path, ClaimsPrincipal user,
        FineTuneDbContext db, IOptions<StorageOptions> storage, HttpContext http, CancellationToken ct)
    {
        var (adapter, problem) = await ResolveAsync(db, user.TenantId(), r, ct);
        if (adapter is null) return problem!;
        if (Gone(adapter) is { } gone) return gone;
        var file = adapter.Files.FirstOrDefault(f => f.Path == path);
        if (file is null) return JsonBody.NotFound($"file '{path}' in {adapter.Name}@v{adapter.Version}");
        var (full, unavailable) = Locate(adapter, [file], storage.Value);
        if (unavailable is not null) return unavailable;
        http.Response.Headers["Repr-Digest"] = $"sha-256=:{Convert.ToBase64String(Convert.FromHexString(file.Sha256))}:";
        var contentType = path.EndsWith(".json", StringComparison.Ordinal) ? "application/json" : "application/octet-stream";
        return TypedResults.PhysicalFile(full[0], contentType, Path.GetFileName(path), lastModified: adapter.CreatedAt,
            entityTag: new EntityTagHeaderValue($"\"{file.Sha256}\""), enableRangeProcessing: true);
    }

    private static ProblemHttpResult? Gone(Adapter a) =>
        a.PurgedAt is not null ? TypedResults.Problem($"{a.Name}@v{a.Version} was purged.", statusCode: 410, title: "Gone")
        : a.DeletedAt is not null ? TypedResults.Problem($"{a.Name}@v{a.Version} is deleted (restore it to download).", statusCode: 410, title: "Gone")
        : null;

    private static (List<string> Paths, ProblemHttpResult? Error) Locate(Adapter adapter, IEnumerable<AdapterFile> files, StorageOptions storage)
    {
        var folder = Path.GetFullPath(Path.Combine(storage.EffectiveArtifactRoot, adapter.Path));
        var list = new List<string>();
        foreach (var f in files)
        {
            var full = Path.GetFullPath(Path.Combine(folder, f.Path));
            if (!Paths.IsUnder(full, folder) || full == folder || !File.Exists(full) || new FileInfo(full).Length != f.Size)
                return ([], TypedResults.Problem("The adapter's files are missing or changed on the server.", statusCode: 409, title: "Adapter unavailable"));
            list.Add(full);
        }
        return (list, null);
    }

    private static string Digest(string text) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)))[..32];

    /// <summary>Finds a version of the caller's tenant; a reference is an alias, or a version as v3 or 3.</summary>
    public static async Task<(Adapter?, ProblemHttpResult?)> ResolveAsync(FineTuneDbContext db, Guid tenant, AdapterRef r, CancellationToken ct)
    {
        Adapter? adapter;
        if (r.Id is { } id) adapter = await db.Adapters.AsNoTracking().FirstOrDefaultAsync(a => a.Id == id && a.TenantId == tenant, ct);
        else if (Names.VersionReference().IsMatch(r.Reference!) && int.TryParse(r.Reference!.TrimStart('v'), out var version))
            adapter = await db.Adapters.AsNoTracking().FirstOrDefaultAsync(a => a.TenantId == tenant && a.Name == r.Task && a.Version == version, ct);
        else
        {
            var alias = await db.AdapterAliases.AsNoTracking().FirstOrDefaultAsync(a => a.TenantId == tenant && a.Task == r.Task && a.Alias == r.Reference, ct);
            adapter = alias is null ? null : await db.Adapters.AsNoTracking().FirstOrDefaultAsync(a => a.Id == alias.AdapterId && a.TenantId == tenant, ct);
        }
        return adapter is null ? (null, JsonBody.NotFound($"adapter {r}")) : (adapter, null);
    }

    private static async Task<ILookup<Guid, string>> AliasesOfAsync(FineTuneDbContext db, Guid tenant, IEnumerable<Guid> ids, CancellationToken ct)
    {
        var list = ids.ToList();
        var rows = await db.AdapterAliases.AsNoTracking().Where(a => a.TenantId == tenant && list.Contains(a.AdapterId))
            .OrderBy(a => a.Alias).Select(a => new { a.AdapterId, a.Alias }).ToListAsync(ct);
        return rows.ToLookup(a => a.AdapterId, a => a.Alias);
    }
}

/// <summary>An adapter version: what it is, where it came from (lineage), how to get it.</summary>
/// <param name="Name">The task (kept as "name" for existing clients).</param>
/// <param name="Reference">task@vN, usable wherever an adapter is named.</param>
/// <param name="Metadata">metadata.json as written by the trainer.</param>
public sealed record AdapterDto(Guid Id, string Name, string Task, int Version, string Reference, Guid? JobId, string Method,
    string BaseModel, IReadOnlyList<AdapterFile> Files, IReadOnlyDictionary<string, object?> Metadata, DateTimeOffset CreatedAt,
    string DownloadUrl, IReadOnlyList<string> Tags, IReadOnlyList<string> Aliases, LineageDto Lineage, long SizeBytes,
    DateTimeOffset? DeletedAt, DateTimeOffset? PurgedAt, DownloadsDto Downloads)
{
    public static AdapterDto From(Adapter a, IEnumerable<string> aliases)
    {
        var url = $"/v1/adapters/{a.Id}";
        return new(a.Id, a.Name, a.Name, a.Version, $"{a.Name}@v{a.Version}", a.JobId, a.MethodType, a.BaseModel, a.Files, a.Metadata,
            a.CreatedAt, url + "/download", a.Tags, [.. aliases], LineageDto.From(a), a.SizeBytes, a.DeletedAt, a.PurgedAt,
            new DownloadsDto(url + "/download", url + "/download?part=peft", url + "/download?part=lora", url + "/files/{path}"));
    }
}

/// <summary>Where a version came from.</summary>
/// <param name="Method">The method spec the job trained with.</param>
public sealed record LineageDto(Guid? JobId, BaseModelLineageDto BaseModel, DatasetLineageDto Dataset, JsonElement? Method,
    JsonElement? Hyperparameters, AdapterMetricsDto Metrics, IReadOnlyList<AdapterFile> Files)
{
    public static LineageDto From(Adapter a)
    {
        JsonElement? Meta(string key) => a.Metadata.TryGetValue(key, out var v) && v is JsonElement e && e.ValueKind != JsonValueKind.Null ? e : null;
        long? Long(string key) => Meta(key) is { ValueKind: JsonValueKind.Number } e && e.TryGetInt64(out var n) ? n : null;
        JsonElement? Parse(string? json) => json is null ? null : JsonDocument.Parse(json).RootElement.Clone();
        var baseFiles = Meta("base_model") is { ValueKind: JsonValueKind.Object } b && b.TryGetProperty("files", out var f) ? f : (JsonElement?)null;
        return new(a.JobId, new BaseModelLineageDto(a.BaseModel, a.BaseModelSha256, baseFiles),
            new DatasetLineageDto(a.DatasetUri, a.DatasetSha256, a.ValidationDatasetUri), Parse(a.Method), Parse(a.Hyperparameters),
            new AdapterMetricsDto(a.FinalLoss, a.FinalValidationLoss, Long("steps"), Long("tokens_seen")), a.Files);
    }
}

/// <param name="Sha256">One checksum of the model folder: sha256 over "name sha256\n" lines of its config and weight files.</param>
/// <param name="Files">Each base-model file with its sha256 and size.</param>
public sealed record BaseModelLineageDto(string Name, string? Sha256, JsonElement? Files);
public sealed record DatasetLineageDto(string? Uri, string? Sha256, string? ValidationUri);
public sealed record AdapterMetricsDto(double? FinalLoss, double? FinalValidationLoss, long? Steps, long? TokensSeen);

/// <param name="File">Template: replace {path} with a file's path (e.g. lora/adapter_model.safetensors).</param>
public sealed record DownloadsDto(string All, string Peft, string Lora, string File);

public sealed record AliasDto(string Task, string Alias, int Version, Guid AdapterId, DateTimeOffset UpdatedAt, Guid? UpdatedBy)
{
    public static AliasDto From(AdapterAlias a) => new(a.Task, a.Alias, a.Version, a.AdapterId, a.UpdatedAt, a.UpdatedBy);
}

/// <param name="Versions">Versions not deleted.</param>
/// <param name="Aliases">alias → version.</param>
public sealed record TaskDto(string Task, int Versions, int? LatestVersion, IReadOnlyDictionary<string, int> Aliases, DateTimeOffset LastPublishedAt);

public sealed record TaskDetailDto(string Task, IReadOnlyList<AliasDto> Aliases, IReadOnlyList<AdapterDto> Versions);

/// <summary>Where an alias should point.</summary>
/// <param name="Version">A version of the task that is not deleted.</param>
public sealed record SetAliasRequest(int Version);

/// <summary>A version's new tags (replacing the old): each <c>^[a-z0-9][a-z0-9._:-]{0,63}$</c>, at most 32.</summary>
public sealed record SetTagsRequest(IReadOnlyList<string> Tags);
