using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;

namespace FineTune.Domain.Adapters;

/// <summary>Lineage facts derived from an adapter's metadata.json (written by the trainer).</summary>
public static class Lineage
{
    /// <summary>
    /// One checksum for a base model folder: sha256 of the UTF-8 lines <c>"&lt;file name&gt; &lt;sha256&gt;\n"</c> of its
    /// config and weight files in ordinal name order (the per-file sha256s are in metadata.json's
    /// <c>base_model.files</c>). Two adapters trained on byte-identical models carry the same value.
    /// </summary>
    public static string? BaseModelChecksum(JsonNode? metadata)
    {
        if (metadata?["base_model"]?["files"] is not JsonArray files || files.Count == 0) return null;
        var lines = new List<(string Name, string Sha)>();
        foreach (var f in files)
        {
            if (f?["name"]?.GetValue<string>() is not { } name || f["sha256"]?.GetValue<string>() is not { } sha) return null;
            lines.Add((name, sha));
        }
        var text = string.Concat(lines.OrderBy(l => l.Name, StringComparer.Ordinal).Select(l => $"{l.Name} {l.Sha}\n"));
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)));
    }

    public static double? Number(JsonNode? metadata, string key) =>
        metadata?[key] is JsonValue v && v.TryGetValue<double>(out var d) && double.IsFinite(d) ? d : null;
}
