using System.Collections.Concurrent;
using FineTune.Domain.Datasets;
using FineTune.Domain.Models;
using FineTune.Domain.Remote;
using Microsoft.Extensions.Logging;

namespace FineTune.Worker.Runner;

/// <summary>
/// A job's inputs as this node sees them, checked against what the API recorded at submit: the model folder (an
/// https:// model's weights are downloaded into the shared cache and verified; a registered local model's weights are
/// hashed and compared with the registry), and the datasets (fetched again when remote, and refused when their sha256
/// changed since submit). Failures are <see cref="JobFailure"/>s with a code and a message for the user.
/// </summary>
public sealed class JobInputs(DatasetSource datasets, DatasetOptions limits, ModelCache cache, ILogger<JobInputs> log)
{
    // Hashing a local model's weights is a full read: remembered per file state, so each job of a node pays it once.
    private static readonly ConcurrentDictionary<string, (string Stamp, string Digest)> Digests = new();

    public async Task<(string Folder, string? WeightsSha256)> ModelFolderAsync(JobRow job, CancellationToken ct)
    {
        if (job.ModelUri is { } uri && RemoteFetcher.IsRemote(uri))
        {
            try
            {
                var weights = await cache.EnsureWeightsAsync(new Uri(uri), job.ModelSha256, ct);
                log.LogInformation("Model {Model}: {Bytes} bytes of weights in the cache (sha256 {Digest})", job.Model, weights.Bytes, weights.Digest);
                return (weights.Folder, weights.Digest);
            }
            catch (Exception e) when (e is RemoteFetchException or InvalidDataException or IOException or UnauthorizedAccessException)
            {
                throw new JobFailure("model_unavailable", $"The model '{job.Model}' cannot be fetched: {e.Message}");
            }
        }
        if (!Directory.Exists(job.ModelPath))
            throw new JobFailure("model_unavailable", $"The model folder '{job.Model}' is not reachable from this node.");
        if (job.ModelSha256 is null) return (job.ModelPath, null);
        string digest;
        try
        {
            digest = await Task.Run(() => LocalDigest(job.ModelPath, ct), ct);
        }
        catch (Exception e) when (e is InvalidDataException or IOException or UnauthorizedAccessException)
        {
            throw new JobFailure("model_unavailable", $"The weights of '{job.Model}' cannot be read: {e.Message}");
        }
        if (!digest.Equals(job.ModelSha256, StringComparison.OrdinalIgnoreCase))
            throw new JobFailure("model_changed",
                $"The weights of '{job.Model}' changed since it was registered (sha256 {digest}, registered {job.ModelSha256}); re-register the model.");
        return (job.ModelPath, digest);
    }

    private static string LocalDigest(string folder, CancellationToken ct)
    {
        var stamp = string.Join("|", WeightsDigest.WeightFiles(folder).Select(n => new FileInfo(Path.Combine(folder, n)))
            .Select(f => $"{f.Name}:{(f.Exists ? f.Length : -1)}:{(f.Exists ? f.LastWriteTimeUtc.Ticks : 0)}"));
        if (Digests.TryGetValue(folder, out var known) && known.Stamp == stamp) return known.Digest;
        var (digest, _) = WeightsDigest.Compute(folder, ct);
        Digests[folder] = (stamp, digest);
        return digest;
    }

    /// <summary>Reads a dataset (downloading it again when remote) and checks it is the content validated at submit.</summary>
    public async Task<DatasetReadResult> ReadDatasetAsync(string reference, string field, string? expectedSha256, CancellationToken ct)
    {
        DatasetReadResult result;
        try
        {
            using var file = await datasets.OpenAsync(reference, ct);
            result = await Task.Run(() => DatasetReader.Read(file.Path, DatasetFormat.Auto, limits.Limits, keepExamples: true, ct), ct);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or DatasetException or DatasetUriException or RemoteFetchException)
        {
            throw new JobFailure("invalid_data", $"{field}: {e.Message}");
        }
        if (expectedSha256 is not null && !result.Sha256.Equals(expectedSha256, StringComparison.OrdinalIgnoreCase))
            throw new JobFailure("dataset_changed",
                $"{field}: the dataset changed since the job was submitted (sha256 {result.Sha256}, at submit {expectedSha256}); " +
                "submit a new job to train on the new content.");
        if (result.ErrorCount > 0)
            throw new JobFailure("invalid_data",
                $"{field}: {result.ErrorCount} bad line(s): {string.Join("; ", result.Errors.Take(5))}");
        if (result.Examples.Count == 0) throw new JobFailure("invalid_data", $"{field}: the dataset has no examples.");
        return result;
    }
}
