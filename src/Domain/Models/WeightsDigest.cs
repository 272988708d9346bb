using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace FineTune.Domain.Models;

/// <summary>One weight file of a model folder with its checksum.</summary>
public sealed record WeightFile(string Name, string Sha256, long Bytes);

/// <summary>
/// The checksum of a model's weights, the one the base-model registry records and the worker verifies. One weight
/// file: its sha256 (what <c>sha256sum model.safetensors</c> prints). Several shards: the sha256 of the
/// <c>sha256sum</c> listing of the shards in name order (<c>sha256sum model-*.safetensors | sha256sum</c>).
/// Which files are weights follows the loader: the shards named by <c>model.safetensors.index.json</c> when there is
/// one, else <c>model.safetensors</c>.
/// </summary>
public static class WeightsDigest
{
    public const string IndexFile = "model.safetensors.index.json";
    public const string SingleFile = "model.safetensors";

    /// <summary>The weight file names of a folder; throws <see cref="InvalidDataException"/> when there are none.</summary>
    public static IReadOnlyList<string> WeightFiles(string folder)
    {
        var index = Path.Combine(folder, IndexFile);
        if (File.Exists(index)) return ShardNames(File.ReadAllBytes(index));
        if (File.Exists(Path.Combine(folder, SingleFile))) return [SingleFile];
        throw new InvalidDataException($"neither {SingleFile} nor {IndexFile} found");
    }

    /// <summary>The distinct shard names of an index's weight_map, in ordinal order; each a plain *.safetensors name.</summary>
    public static IReadOnlyList<string> ShardNames(ReadOnlySpan<byte> indexJson)
    {
        try
        {
            using var doc = JsonDocument.Parse(indexJson.ToArray());
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("weight_map", out var map)
                || map.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{IndexFile} has no weight_map object");
            var names = new SortedSet<string>(StringComparer.Ordinal);
            foreach (var p in map.EnumerateObject())
            {
                var name = p.Value.ValueKind == JsonValueKind.String ? p.Value.GetString()! : "";
                // A name from a downloaded index becomes a local path and a URL: only plain file names.
                if (name.Length is 0 or > 255 || name.IndexOfAny(['/', '\\', '\0', ':', '?', '#', '%']) >= 0 || name.StartsWith('.')
                    || !name.EndsWith(".safetensors", StringComparison.Ordinal))
                    throw new InvalidDataException($"{IndexFile}: weight_map['{p.Name}'] must name a plain *.safetensors file");
                names.Add(name);
            }
            if (names.Count == 0) throw new InvalidDataException($"{IndexFile}: weight_map is empty");
            return [.. names];
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{IndexFile} is not valid JSON: {e.Message}", e);
        }
    }

    /// <summary>The digest of files already hashed (any order).</summary>
    public static string Combine(IReadOnlyList<WeightFile> files)
    {
        if (files.Count == 1) return files[0].Sha256;
        var listing = new StringBuilder();
        foreach (var f in files.OrderBy(f => f.Name, StringComparer.Ordinal)) listing.Append(f.Sha256).Append("  ").Append(f.Name).Append('\n');
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(listing.ToString())));
    }

    /// <summary>Hashes the weight files of a local folder.</summary>
    public static (string Digest, IReadOnlyList<WeightFile> Files) Compute(string folder, CancellationToken ct = default)
    {
        var files = new List<WeightFile>();
        foreach (var name in WeightFiles(folder))
        {
            ct.ThrowIfCancellationRequested();
            var path = Path.Combine(folder, name);
            if (!File.Exists(path)) throw new InvalidDataException($"weight file '{name}' listed in {IndexFile} does not exist");
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, FileOptions.SequentialScan);
            files.Add(new WeightFile(name, Convert.ToHexStringLower(SHA256.HashData(stream)), stream.Length));
        }
        return (Combine(files), files);
    }

    public static bool IsSha256(string? s) => s is { Length: 64 } && s.All(char.IsAsciiHexDigit);
}
