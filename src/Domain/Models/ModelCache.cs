using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using FineTune.Domain.Remote;

namespace FineTune.Domain.Models;

/// <summary>The weights of a remote model once they are in the cache and verified.</summary>
public sealed record CachedWeights(string Folder, string Digest, long Bytes, IReadOnlyList<WeightFile> Files);

/// <summary>
/// Local copies of models named by an https:// URI of their folder (<c>https://host/path/</c> + <c>config.json</c>,
/// <c>tokenizer.json</c>, <c>model.safetensors</c> or the index and its shards; a Hugging Face
/// <c>…/resolve/&lt;revision&gt;/</c> URL works). One folder per URI under the cache root, which the API and the
/// workers share (like the artifact root). The API fetches only the small files it validates with
/// (<see cref="EnsureMetadataAsync"/>); a worker fetches the weights (<see cref="EnsureWeightsAsync"/>).
/// <para>Files are renamed into place only when complete; a folder is usable once its marker file is written, after
/// the checksum was verified. Concurrent fetches of one model (threads or processes on the shared volume) take a
/// lock file, so the weights are downloaded once and the others wait and reuse them.</para>
/// </summary>
public sealed class ModelCache(string root, RemoteFetcher fetcher)
{
    public const string MetadataMarker = ".metadata.json", WeightsMarker = ".weights.json";

    /// <summary>The small files of a model folder: config.json is required, the others are taken when present.</summary>
    public static readonly string[] MetadataFiles =
        ["config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
         "generation_config.json", WeightsDigest.IndexFile];

    public string Root => root;

    /// <summary>The folder URI: no fragment, and a trailing slash so that file names resolve below it.</summary>
    public static Uri Normalize(Uri uri)
    {
        var b = new UriBuilder(uri) { Fragment = "" };
        if (!b.Path.EndsWith('/')) b.Path += "/";
        return b.Uri;
    }

    public string FolderFor(Uri folderUri) =>
        Path.Combine(root, Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(Normalize(folderUri).AbsoluteUri)))[..32]);

    /// <summary>config.json, the tokenizer files and the shard index in the cache (fetched when missing); the folder.</summary>
    public async Task<string> EnsureMetadataAsync(Uri folderUri, CancellationToken ct)
    {
        folderUri = Normalize(folderUri);
        var folder = FolderFor(folderUri);
        if (File.Exists(Path.Combine(folder, MetadataMarker))) return folder;
        Directory.CreateDirectory(folder);
        await using var held = await LockAsync(Path.Combine(folder, ".lock-metadata"), fetcher.Options.Timeout * 2, ct);
        if (File.Exists(Path.Combine(folder, MetadataMarker))) return folder;
        var limits = new FetchLimits(fetcher.Options.MaxFileBytes, "Remote:MaxFileBytes", fetcher.Options.Timeout, "Remote:Timeout");
        var fetched = new List<WeightFile>();
        foreach (var name in MetadataFiles)
        {
            var required = name == "config.json";
            var file = await fetcher.DownloadAsync(new Uri(folderUri, name), Path.Combine(folder, name), limits, optional: !required, ct);
            if (file is not null) fetched.Add(new WeightFile(name, file.Sha256, file.Bytes));
        }
        if (File.Exists(Path.Combine(folder, WeightsDigest.IndexFile)))
            WeightsDigest.ShardNames(File.ReadAllBytes(Path.Combine(folder, WeightsDigest.IndexFile))); // refuse a bad index now
        WriteMarker(Path.Combine(folder, MetadataMarker), new { uri = folderUri.AbsoluteUri, files = fetched });
        return folder;
    }

    /// <summary>
    /// The weights in the cache, downloaded once and verified against <paramref name="expectedSha256"/> when given
    /// (see <see cref="WeightsDigest"/>). A mismatch deletes what was downloaded and throws.
    /// </summary>
    public async Task<CachedWeights> EnsureWeightsAsync(Uri folderUri, string? expectedSha256, CancellationToken ct)
    {
        folderUri = Normalize(folderUri);
        var folder = await EnsureMetadataAsync(folderUri, ct);
        var markerPath = Path.Combine(folder, WeightsMarker);
        if (ReadWeightsMarker(folder) is { } cached) return Checked(cached, folderUri, expectedSha256);
        await using var held = await LockAsync(Path.Combine(folder, ".lock-weights"), fetcher.Options.WeightsTimeout, ct);
        if (ReadWeightsMarker(folder) is { } done) return Checked(done, folderUri, expectedSha256);

        var index = Path.Combine(folder, WeightsDigest.IndexFile);
        var names = File.Exists(index) ? WeightsDigest.ShardNames(File.ReadAllBytes(index)) : [WeightsDigest.SingleFile];
        var files = new List<WeightFile>();
        long total = 0;
        try
        {
            foreach (var name in names)
            {
                var limits = new FetchLimits(fetcher.Options.MaxModelBytes - total, "Remote:MaxModelBytes",
                    fetcher.Options.WeightsTimeout, "Remote:WeightsTimeout");
                var f = (await fetcher.DownloadAsync(new Uri(folderUri, name), Path.Combine(folder, name), limits, ct: ct))!;
                total += f.Bytes;
                files.Add(new WeightFile(name, f.Sha256, f.Bytes));
            }
            var digest = WeightsDigest.Combine(files);
            if (expectedSha256 is not null && !digest.Equals(expectedSha256, StringComparison.OrdinalIgnoreCase))
                throw new RemoteFetchException(
                    $"the weights of {RemoteFetcher.Show(folderUri)} have sha256 {digest}, not the expected {expectedSha256.ToLowerInvariant()}");
            var result = new CachedWeights(folder, digest, total, files);
            WriteMarker(markerPath, new { uri = folderUri.AbsoluteUri, digest, bytes = total, files });
            return result;
        }
        catch
        {
            foreach (var f in files) TryDelete(Path.Combine(folder, f.Name));
            throw;
        }
    }

    private static CachedWeights Checked(CachedWeights cached, Uri uri, string? expected) =>
        expected is null || cached.Digest.Equals(expected, StringComparison.OrdinalIgnoreCase) ? cached
            : throw new RemoteFetchException(
                $"the cached weights of {RemoteFetcher.Show(uri)} have sha256 {cached.Digest}, not the expected {expected.ToLowerInvariant()}");

    /// <summary>The marker of verified weights; an unreadable one counts as absent (the weights are fetched again).</summary>
    private static CachedWeights? ReadWeightsMarker(string folder)
    {
        var path = Path.Combine(folder, WeightsMarker);
        if (!File.Exists(path)) return null;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            var r = doc.RootElement;
            var files = r.GetProperty("files").EnumerateArray()
                .Select(f => new WeightFile(f.GetProperty("name").GetString()!, f.GetProperty("sha256").GetString()!, f.GetProperty("bytes").GetInt64()))
                .ToList();
            return new CachedWeights(folder, r.GetProperty("digest").GetString()!, r.GetProperty("bytes").GetInt64(), files);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            return null;
        }
    }

    private static void WriteMarker(string path, object content)
    {
        var temp = $"{path}.tmp-{Guid.NewGuid():N}";
        File.WriteAllBytes(temp, JsonSerializer.SerializeToUtf8Bytes(content, new JsonSerializerOptions(JsonSerializerDefaults.Web)));
        File.Move(temp, path, overwrite: true);
    }

    /// <summary>An exclusive lock file (flock on Unix): held by one process and one thread at a time; others wait.</summary>
    private static async Task<FileStream> LockAsync(string path, TimeSpan maxWait, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + maxWait;
        while (true)
        {
            try
            {
                return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(100, ct);
            }
            catch (IOException e)
            {
                throw new RemoteFetchException($"another fetch of this model has held {Path.GetFileName(path)} for more than {maxWait}", e);
            }
        }
    }

    private static void TryDelete(string path)
    {
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
