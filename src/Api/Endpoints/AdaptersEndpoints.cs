using System.IO.Compression;
using System.IO.Pipelines;
using System.Security.Claims;
using FineTune.Api.Infrastructure;
using FineTune.Domain.Adapters;
using FineTune.Domain.Persistence;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Endpoints;

public static class AdaptersEndpoints
{
    public static RouteGroupBuilder MapAdapters(this IEndpointRouteBuilder app)
    {
        var group = app.MapGroup("/v1/adapters").WithTags("Adapters").RequireAuthorization();
        group.MapGet("/", List).WithName("ListAdapters").WithSummary("List adapter versions, newest first (filter by name)");
        group.MapGet("/{id:guid}", Get).WithName("GetAdapter").WithSummary("Get an adapter version");
        group.MapGet("/{id:guid}/download", Download).WithName("DownloadAdapter")
            .Produces(StatusCodes.Status200OK, contentType: "application/zip")
            .WithSummary("Download an adapter version as a zip of its files");
        return group;
    }

    private static async Task<Results<Ok<Page<AdapterDto>>, ProblemHttpResult>> List(
        ClaimsPrincipal user, FineTuneDbContext db, string? name, int? limit, string? after, CancellationToken ct)
    {
        var tenant = user.TenantId();
        var query = db.Adapters.AsNoTracking().Where(a => a.TenantId == tenant);
        if (name is not null) query = query.Where(a => a.Name == name);
        var take = limit ?? 20;
        if (take is < 1 or > 100) return FineTunesEndpoints.BadQuery("limit", "must be between 1 and 100");
        if (after is not null)
        {
            if (!Cursor.TryDecode(after, out var at, out var id)) return FineTunesEndpoints.BadQuery("after", "is not a cursor returned by this API");
            query = query.Where(a => EF.Functions.LessThan(ValueTuple.Create(a.CreatedAt, a.Id), ValueTuple.Create(at, id)));
        }
        var rows = await query.OrderByDescending(a => a.CreatedAt).ThenByDescending(a => a.Id).Take(take + 1).ToListAsync(ct);
        var page = rows.Take(take).ToList();
        var next = rows.Count > take ? Cursor.Encode(page[^1].CreatedAt, page[^1].Id) : null;
        return TypedResults.Ok(new Page<AdapterDto>([.. page.Select(AdapterDto.From)], next));
    }

    private static async Task<Results<Ok<AdapterDto>, ProblemHttpResult>> Get(Guid id, ClaimsPrincipal user, FineTuneDbContext db, CancellationToken ct) =>
        await Find(db, user, id, ct) is { } a ? TypedResults.Ok(AdapterDto.From(a)) : NotFound(id);

    /// <summary>Streams a zip of the files the adapter row lists (each confined to the adapter folder and checked
    /// against its recorded size before the first byte goes out).</summary>
    private static async Task<Results<EmptyHttpResult, ProblemHttpResult>> Download(
        Guid id, HttpContext http, ClaimsPrincipal user, FineTuneDbContext db, IOptions<StorageOptions> storage, CancellationToken ct)
    {
        if (await Find(db, user, id, ct) is not { } adapter) return NotFound(id);
        var folder = Path.GetFullPath(Path.Combine(storage.Value.EffectiveArtifactRoot, adapter.Path));
        var files = new List<(string Entry, string FullPath)>();
        foreach (var f in adapter.Files)
        {
            var full = Path.GetFullPath(Path.Combine(folder, f.Path));
            if (!Paths.IsUnder(full, folder) || full == folder || !File.Exists(full) || new FileInfo(full).Length != f.Size)
                return TypedResults.Problem("The adapter's files are missing or changed on the server.", statusCode: 409, title: "Adapter unavailable");
            files.Add((Path.GetRelativePath(folder, full).Replace('\\', '/'), full));
        }

        http.Response.ContentType = "application/zip";
        // Adapter names are [a-z0-9._-]: safe inside quotes as they are.
        http.Response.Headers.ContentDisposition = $"attachment; filename=\"{adapter.Name}-v{adapter.Version}.zip\"";
        // ZipArchive writes synchronously, which the server forbids on the response: the zip is written on a
        // worker thread into a bounded pipe, and the request copies the pipe out asynchronously (back-pressure
        // keeps memory at the pipe's size whatever the adapter's).
        var pipe = new Pipe(new PipeOptions(pauseWriterThreshold: 1 << 20, resumeWriterThreshold: 1 << 19));
        var producer = Task.Run(async () =>
        {
            try
            {
                await using (var output = pipe.Writer.AsStream(leaveOpen: true))
                using (var zip = new ZipArchive(output, ZipArchiveMode.Create, leaveOpen: true))
                    foreach (var (entry, full) in files)
                    {
                        // safetensors are dense floats: compression buys little and costs CPU on every download.
                        var level = entry.EndsWith(".json", StringComparison.Ordinal) ? CompressionLevel.Fastest : CompressionLevel.NoCompression;
                        await using var target = zip.CreateEntry(entry, level).Open();
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

    private static Task<Adapter?> Find(FineTuneDbContext db, ClaimsPrincipal user, Guid id, CancellationToken ct)
    {
        var tenant = user.TenantId();
        return db.Adapters.AsNoTracking().FirstOrDefaultAsync(a => a.Id == id && a.TenantId == tenant, ct);
    }

    private static ProblemHttpResult NotFound(Guid id) => TypedResults.Problem($"No adapter {id}.", statusCode: 404, title: "Not found");
}
