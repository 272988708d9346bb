using System.Text.RegularExpressions;
using FineTune.Api.Submission;
using FineTune.Domain.Models;
using FineTune.Domain.Persistence;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace FineTune.Api.BaseModels;

/// <summary>A base model to register: a name jobs may use, the model's folder URI, and optionally the weights checksum.</summary>
/// <param name="Name">^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$, e.g. llama-3.2-1b.</param>
/// <param name="Uri"><c>file:///folder</c> under a model root, or <c>https://host/folder/</c> (config.json, tokenizer
/// and weights below it; e.g. a Hugging Face <c>…/resolve/&lt;commit&gt;/</c> URL).</param>
/// <param name="Sha256">The weights checksum: sha256 of model.safetensors, or for shards of
/// <c>sha256sum model-*.safetensors | sha256sum</c>. Computed for file:// models (and compared when given); for
/// https:// models the worker verifies the download against it.</param>
public sealed record RegisterBaseModelRequest(string Name, string Uri, string? Sha256 = null);

/// <summary>The base-model registry: registration checks, and seeding from the <c>Models</c> configuration.</summary>
public sealed partial class BaseModelRegistry(ModelResolver models, IDbContextFactory<FineTuneDbContext> dbs, ILogger<BaseModelRegistry> log)
{
    [GeneratedRegex("^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] private static partial Regex NamePattern();

    public sealed class DuplicateName(string name) : Exception($"a base model named '{name}' is already registered");

    /// <summary>Validates and stores a registration; a problem for bad input, <see cref="DuplicateName"/> for a taken name.</summary>
    public async Task<(BaseModel? Model, SubmissionError? Error)> RegisterAsync(RegisterBaseModelRequest r, CancellationToken ct)
    {
        var errors = new Dictionary<string, string[]>();
        if (!NamePattern().IsMatch(r.Name)) errors["name"] = ["must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"];
        if (r.Sha256 is not null && !WeightsDigest.IsSha256(r.Sha256)) errors["sha256"] = ["must be 64 hexadecimal characters"];
        var sha = errors.ContainsKey("sha256") ? null : r.Sha256?.ToLowerInvariant();
        var (model, error) = await Build(r.Name, r.Uri, sha, confine: true, ct);
        if (error is not null) errors[error.Value.Field] = [error.Value.Message];
        if (errors.Count > 0)
            return (null, new(StatusCodes.Status422UnprocessableEntity, "The base model is not valid",
                string.Join("; ", errors.Select(kv => $"{kv.Key}: {kv.Value[0]}")), errors));

        await using var db = await dbs.CreateDbContextAsync(ct);
        db.BaseModels.Add(model!);
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (e.InnerException is PostgresException { SqlState: PostgresErrorCodes.UniqueViolation })
        {
            throw new DuplicateName(r.Name);
        }
        return (model, null);
    }

    /// <summary>Reads a model's config.json and tokenizer (and for a local folder hashes its weights) into a row.</summary>
    private async Task<(BaseModel? Model, (string Field, string Message)? Error)> Build(string name, string uri, string? sha256,
        bool confine, CancellationToken ct)
    {
        var (opened, error) = await models.OpenAsync(uri, confine, ct);
        if (error is not null) return (null, ("uri", error));
        var m = opened!;
        if (m.TokenizerError is not null) return (null, ("uri", m.TokenizerError));
        long? bytes = null;
        var digest = sha256;
        if (!m.Remote)
        {
            try
            {
                var (computed, files) = await Task.Run(() => WeightsDigest.Compute(m.Folder, ct), ct);
                if (sha256 is not null && computed != sha256)
                    return (null, ("sha256", $"the weights in the folder have sha256 {computed}, not {sha256}"));
                (digest, bytes) = (computed, files.Sum(f => f.Bytes));
            }
            catch (Exception e) when (e is InvalidDataException or IOException or UnauthorizedAccessException)
            {
                return (null, ("uri", $"the weights cannot be read: {e.Message}"));
            }
        }
        var row = new BaseModel { Name = name, Uri = m.Uri, Sha256 = digest, Architecture = "", ModelType = "", WeightsBytes = bytes };
        row.SetShapes(m.Config);
        return (row, null);
    }

    /// <summary>
    /// Makes the registry's "config" rows match the <c>Models</c> configuration (name → folder): new names are
    /// registered, changed folders re-registered, removed names deleted. Names registered over the API are never
    /// touched. A folder that cannot be registered is logged and skipped, so one bad entry does not stop the API.
    /// Several replicas starting together serialise on an advisory lock.
    /// </summary>
    public async Task SeedAsync(IReadOnlyDictionary<string, string> configured, CancellationToken ct)
    {
        await using var db = await dbs.CreateDbContextAsync(ct);
        await using var tx = await db.Database.BeginTransactionAsync(ct);
        await db.Database.ExecuteSqlRawAsync("SELECT pg_advisory_xact_lock(hashtextextended('base-models-seed', 0))", ct);
        var rows = await db.BaseModels.ToDictionaryAsync(m => m.Name, ct);
        foreach (var stale in rows.Values.Where(m => m.Source == BaseModel.FromConfig && !configured.ContainsKey(m.Name)))
        {
            db.BaseModels.Remove(stale);
            log.LogInformation("Base model {Name} is no longer configured; removed from the registry", stale.Name);
        }
        foreach (var (name, folder) in configured)
        {
            var uri = new Uri(Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder))).AbsoluteUri;
            if (rows.TryGetValue(name, out var existing))
            {
                if (existing.Source != BaseModel.FromConfig)
                {
                    log.LogWarning("Models:{Name} is also registered over the API; the registered one is kept", name);
                    continue;
                }
                if (existing.Uri == uri) continue;
                db.BaseModels.Remove(existing);
            }
            var (row, error) = await Build(name, uri, null, confine: false, ct);
            if (error is not null)
            {
                log.LogWarning("Models:{Name} ({Folder}) cannot be registered: {Error}", name, folder, error.Value.Message);
                continue;
            }
            row!.Source = BaseModel.FromConfig;
            db.BaseModels.Add(row);
        }
        await db.SaveChangesAsync(ct);
        await tx.CommitAsync(ct);
    }
}
