using System.Collections.Concurrent;
using System.Text.Json;
using FineTune.Api.Infrastructure;
using FineTune.Domain.Models;
using FineTune.Domain.Persistence;
using FineTune.Domain.Remote;
using FineTune.Domain.Tokenizers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Submission;

/// <summary>
/// Turns a model reference into a local folder with its config.json and tokenizer: a registered base-model name, a
/// folder name under a model root, a <c>file://</c> folder under a model root, or an <c>https://</c> folder (whose
/// config.json and tokenizer files are fetched into the model cache; the weights are left to the worker).
/// </summary>
public sealed class ModelResolver(IOptions<StorageOptions> storage, RemoteFetcher fetcher, ModelCache cache,
    IDbContextFactory<FineTuneDbContext> dbs)
{
    /// <param name="Folder">Local folder holding config.json and the tokenizer (the model cache for https models).</param>
    /// <param name="Uri">Canonical source: file:///folder or the normalised https:// folder URI.</param>
    /// <param name="Sha256">The registered weights checksum, when the reference is a registered name.</param>
    public sealed record Resolved(string Folder, ModelConfig Config, ITokenizer? Tokenizer, string? TokenizerError,
        string Uri, bool Remote, string? Sha256 = null, string? RegisteredName = null);

    private readonly ConcurrentDictionary<string, (DateTime Written, long Length, ITokenizer Tokenizer)> _tokenizers = new();

    public async Task<(Resolved? Model, string? Error)> ResolveAsync(string reference, CancellationToken ct)
    {
        if (string.IsNullOrWhiteSpace(reference)) return (null, "must not be empty");
        if (!reference.Contains(':') && !reference.Contains('/'))
        {
            await using var db = await dbs.CreateDbContextAsync(ct);
            var registered = await db.BaseModels.AsNoTracking().FirstOrDefaultAsync(m => m.Name == reference, ct);
            if (registered is not null)
            {
                // Registry rows were checked when registered (or come from the operator's configuration): not re-confined.
                var (model, error) = await OpenAsync(registered.Uri, confine: false, ct);
                if (error is not null) return (null, $"registered model '{reference}': {error}");
                var changed = registered.Differences(model!.Config).ToList();
                if (changed.Count > 0)
                    return (null, $"registered model '{reference}' no longer matches its registration: {string.Join(", ", changed)}");
                return (model with { Sha256 = registered.Sha256, RegisteredName = registered.Name }, null);
            }
            var (local, localError) = await OpenAsync(reference, confine: true, ct);
            if (localError is null) return (local, null);
            return (null, localError.Contains("not found", StringComparison.Ordinal)
                ? $"model '{reference}' not found: it is neither a registered base model (GET /v1/base-models) nor a folder under the model roots"
                : localError);
        }
        return await OpenAsync(reference, confine: true, ct);
    }

    /// <summary>Opens a model URI (or a path) and reads its config.json and tokenizer. Never throws for bad input.</summary>
    public async Task<(Resolved? Model, string? Error)> OpenAsync(string reference, bool confine, CancellationToken ct)
    {
        string folder, canonical;
        var remote = RemoteFetcher.IsRemote(reference);
        if (remote)
        {
            try
            {
                var uri = ModelCache.Normalize(fetcher.Parse(reference));
                folder = await cache.EnsureMetadataAsync(uri, ct);
                canonical = uri.AbsoluteUri;
            }
            catch (RemoteFetchException e) { return (null, e.Message); }
            catch (InvalidDataException e) { return (null, e.Message); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                return (null, $"the model cache cannot be written on this server: {e.Message}");
            }
        }
        else
        {
            if (confine)
            {
                var (path, error) = Paths.Confine(reference, storage.Value.EffectiveModelRoots);
                if (error is not null) return (null, error);
                folder = path!;
            }
            else if (reference.StartsWith("file://", StringComparison.OrdinalIgnoreCase) && Uri.TryCreate(reference, UriKind.Absolute, out var u))
                folder = u.LocalPath;
            else folder = Path.GetFullPath(reference);
            if (!Directory.Exists(folder)) return (null, $"model folder '{reference}' not found");
            canonical = new Uri(Path.TrimEndingDirectorySeparator(folder)).AbsoluteUri;
        }
        if (!File.Exists(Path.Combine(folder, "config.json"))) return (null, $"model '{reference}' has no config.json");
        ModelConfig config;
        try
        {
            config = ModelConfig.Load(folder);
        }
        catch (Exception e) when (e is InvalidDataException or JsonException or IOException or UnauthorizedAccessException)
        {
            return (null, $"cannot read config.json of '{reference}': {e.Message}");
        }
        var (tokenizer, tokenizerError) = LoadTokenizer(folder, reference);
        return (new Resolved(folder, config, tokenizer, tokenizerError, canonical, remote), null);
    }

    /// <summary>Tokenizers are cached by file, since loading a large tokenizer.json per submit would dominate it.</summary>
    private (ITokenizer?, string?) LoadTokenizer(string folder, string reference)
    {
        try
        {
            var file = new FileInfo(Path.Combine(folder, "tokenizer.json"));
            if (file.Exists && _tokenizers.TryGetValue(folder, out var hit) && hit.Written == file.LastWriteTimeUtc && hit.Length == file.Length)
                return (hit.Tokenizer, null);
            var tokenizer = TokenizerLoader.Load(folder);
            if (file.Exists)
            {
                if (_tokenizers.Count > 16) _tokenizers.Clear();
                _tokenizers[folder] = (file.LastWriteTimeUtc, file.Length, tokenizer);
            }
            return (tokenizer, null);
        }
        catch (TokenizerException e)
        {
            // The message names the local folder; the user knows the model by its reference.
            return (null, $"the tokenizer of '{reference}' cannot be used: {e.Message.Replace(folder, reference)}");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or JsonException or InvalidDataException)
        {
            return (null, $"the tokenizer of '{reference}' cannot be read: {e.Message.Replace(folder, reference)}");
        }
    }
}
