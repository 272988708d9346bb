using System.Text.Json.Nodes;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training;

/// <summary>
/// The optional <c>merged/</c> folder of an adapter (job option <c>merge: true</c>): the base model with the adapter
/// merged in (W ← W + ΔW through <see cref="IAdapterMethod.Merge"/>, so it works for every method), as a Hugging Face
/// model folder: config.json and the tokenizer files copied from the base, one model.safetensors with every tensor in
/// the base checkpoint's dtype. It is a full copy of the model (a 7B bf16 base: ~13.5 GB), written tensor by tensor in
/// slices, after checking the artifact volume has room for it.
/// </summary>
public static class MergedModel
{
    public const string Dir = "merged";
    public const string Weights = "model.safetensors";

    /// <summary>Files besides the weights that make the folder a loadable model: config and tokenizer.</summary>
    private static readonly string[] CopiedNames =
        ["config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
         "chat_template.jinja", "chat_template.json"];

    /// <summary>Free space left on the volume after the copy, so the merge does not fill it to the last byte.</summary>
    public const long Headroom = 64L << 20;

    /// <summary>Writes <c>&lt;adapterDir&gt;/merged/</c>; returns the files written relative to <paramref name="adapterDir"/>
    /// and what metadata.json records about it. The model is left unmerged.</summary>
    public static IReadOnlyList<string> Write(string adapterDir, Llama model, IAdapterMethod method, string baseModelDir, out JsonObject info)
    {
        var dir = Path.Combine(adapterDir, Dir);
        Directory.CreateDirectory(dir);
        var state = model.StateDict();
        var baseTypes = BaseDTypes(baseModelDir);
        ScalarType? DTypeOf(string name) => baseTypes.TryGetValue(name, out var t) ? t : null;
        var bytes = state.Sum(kv => kv.Value.NumEl * Safetensors.ElementSize(DTypeOf(kv.Key) ?? kv.Value.DType));
        CheckRoom(dir, bytes);

        method.Merge();
        try
        {
            Safetensors.Save(Path.Combine(dir, Weights), state, new Dictionary<string, string> { ["format"] = "pt" }, DTypeOf);
        }
        finally { method.Unmerge(); }

        var files = new List<string> { $"{Dir}/{Weights}" };
        foreach (var source in Directory.EnumerateFiles(baseModelDir).Order(StringComparer.Ordinal))
        {
            var name = Path.GetFileName(source);
            if (!CopiedNames.Contains(name) && !name.StartsWith("tokenizer", StringComparison.Ordinal)) continue;
            File.Copy(source, Path.Combine(dir, name), overwrite: true);
            files.Add($"{Dir}/{name}");
        }
        info = new JsonObject
        {
            ["dir"] = Dir,
            ["bytes"] = bytes,
            ["dtypes"] = new JsonArray(state.Keys.Select(k => Safetensors.Name(DTypeOf(k) ?? state[k].DType)).Distinct()
                .Order(StringComparer.Ordinal).Select(n => (JsonNode)n).ToArray()),
        };
        return files;
    }

    /// <summary>Each tensor's dtype in the base checkpoint (model.safetensors, or the shards of its index).</summary>
    public static Dictionary<string, ScalarType> BaseDTypes(string modelDir)
    {
        var index = Path.Combine(modelDir, "model.safetensors.index.json");
        var files = File.Exists(index)
            ? Safetensors.ReadIndex(index).Values.Distinct().Select(f => Path.Combine(modelDir, f))
            : [Path.Combine(modelDir, "model.safetensors")];
        var types = new Dictionary<string, ScalarType>();
        foreach (var f in files)
        {
            using var file = SafetensorsFile.Open(f);
            foreach (var (name, entry) in file.Entries)
                if (Safetensors.DTypes.TryGetValue(entry.DType, out var t)) types[name] = t;
        }
        return types;
    }

    /// <summary>Bytes available to us on the file system holding <paramref name="dir"/> (statvfs); null if unknown.</summary>
    public static long? FreeBytes(string dir)
    {
        try { return new DriveInfo(Path.GetFullPath(dir)).AvailableFreeSpace; }
        catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException) { return null; }
    }

    private static void CheckRoom(string dir, long bytes)
    {
        if (FreeBytes(dir) is not { } free) return;
        if (free < bytes + Headroom)
            throw new IOException($"merge: the merged model needs {bytes / 1e9:F2} GB but the artifact volume has " +
                                  $"{free / 1e9:F2} GB free; free space or submit without merge");
    }
}
