using FineTune.Api.Infrastructure;
using FineTune.Domain.Models;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Submission;

/// <summary>Turns a model reference into a folder and its config.json.</summary>
public sealed class ModelResolver(IOptions<StorageOptions> storage, SubmissionOptions options)
{
    public sealed record Resolved(string Folder, ModelConfig Config);

    public (Resolved? Model, string? Error) Resolve(string reference)
    {
        string folder;
        if (options.Models.TryGetValue(reference, out var registered))
            folder = Path.GetFullPath(registered);
        else
        {
            if (string.IsNullOrWhiteSpace(reference)) return (null, "must not be empty");
            var (path, error) = Paths.Confine(reference, storage.Value.EffectiveModelRoots);
            if (error is not null)
                return (null, options.Models.Count == 0 || reference.Contains('/') ? error
                    : $"unknown model '{reference}'; registered: {string.Join(", ", options.Models.Keys.Order())}");
            folder = path!;
        }
        if (!Directory.Exists(folder)) return (null, $"model folder '{reference}' not found");
        if (!File.Exists(Path.Combine(folder, "config.json"))) return (null, $"model '{reference}' has no config.json");
        try
        {
            return (new Resolved(folder, ModelConfig.Load(folder)), null);
        }
        catch (Exception e) when (e is InvalidDataException or System.Text.Json.JsonException or IOException or UnauthorizedAccessException)
        {
            return (null, $"cannot read config.json of '{reference}': {e.Message}");
        }
    }
}
