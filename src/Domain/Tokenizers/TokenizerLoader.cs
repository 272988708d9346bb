using System.Text.Json;

namespace FineTune.Domain.Tokenizers;

/// <summary>Loads a model folder's tokenizer: <c>tokenizer.json</c>, with BOS/EOS/pad names from
/// <c>tokenizer_config.json</c> when present.</summary>
public static class TokenizerLoader
{
    public static HfTokenizer Load(string modelDir)
    {
        var tokenizerJson = Path.Combine(modelDir, "tokenizer.json");
        if (!File.Exists(tokenizerJson))
            throw new TokenizerException(
                $"no tokenizer.json in {modelDir} (only Hugging Face fast-tokenizer files are supported; " +
                "SentencePiece tokenizer.model files are not supported yet)");
        var (bos, eos, pad) = ReadConfig(Path.Combine(modelDir, "tokenizer_config.json"));
        return HfTokenizer.FromFile(tokenizerJson, bos, eos, pad);
    }

    private static (string? Bos, string? Eos, string? Pad) ReadConfig(string path)
    {
        if (!File.Exists(path)) return (null, null, null);
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new TokenizerException("tokenizer_config.json: the top level is not an object");
            return (TokenName(root, "bos_token"), TokenName(root, "eos_token"), TokenName(root, "pad_token"));
        }
        catch (JsonException e)
        {
            throw new TokenizerException($"tokenizer_config.json is not valid JSON: {e.Message}", e);
        }
        catch (IOException e)
        {
            throw new TokenizerException($"cannot read {path}: {e.Message}", e);
        }
    }

    // Written either as "<s>" or as {"content": "<s>", ...} (an AddedToken); null means none.
    private static string? TokenName(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.Null => null,
            JsonValueKind.String => v.GetString(),
            JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
            _ => throw new TokenizerException($"tokenizer_config.json: \"{name}\" must be a string, {{\"content\": ...}} or null"),
        };
    }
}
