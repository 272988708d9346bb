using System.Text.Json;

namespace FineTune.Domain.Tokenizers;

/// <summary>What tokenizer_config.json says beside the tokenizer file: special token names, whether BOS/EOS are added,
/// and the chat template (or the <c>chat_template.jinja</c> file newer transformers write beside it).</summary>
public sealed record TokenizerConfig(string? BosToken, string? EosToken, string? PadToken, bool? AddBosToken,
    bool? AddEosToken, string? ChatTemplate)
{
    public const long MaxConfigBytes = 16L << 20;

    public static TokenizerConfig Read(string modelDir)
    {
        var path = Path.Combine(modelDir, "tokenizer_config.json");
        string? template = null;
        TokenizerConfig config = new(null, null, null, null, null, null);
        if (File.Exists(path))
        {
            try
            {
                if (new FileInfo(path).Length > MaxConfigBytes)
                    throw new TokenizerException($"tokenizer_config.json is larger than {MaxConfigBytes} bytes");
                using var doc = JsonDocument.Parse(File.ReadAllText(path));
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object)
                    throw new TokenizerException("tokenizer_config.json: the top level is not an object");
                template = ReadTemplate(root);
                config = new TokenizerConfig(TokenName(root, "bos_token"), TokenName(root, "eos_token"),
                    TokenName(root, "pad_token"), OptionalBool(root, "add_bos_token"), OptionalBool(root, "add_eos_token"), template);
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
        var jinja = Path.Combine(modelDir, "chat_template.jinja");
        if (template is null && File.Exists(jinja))
        {
            try { config = config with { ChatTemplate = File.ReadAllText(jinja) }; }
            catch (IOException e) { throw new TokenizerException($"cannot read {jinja}: {e.Message}", e); }
        }
        return config;
    }

    // Written either as one string or as a list of {"name", "template"} (the "default" one is used).
    private static string? ReadTemplate(JsonElement root)
    {
        if (!root.TryGetProperty("chat_template", out var t) || t.ValueKind == JsonValueKind.Null) return null;
        if (t.ValueKind == JsonValueKind.String) return t.GetString();
        if (t.ValueKind == JsonValueKind.Array)
        {
            foreach (var entry in t.EnumerateArray())
                if (entry.ValueKind == JsonValueKind.Object && Json.String(entry, "name") == "default")
                    return Json.String(entry, "template");
            throw new TokenizerException("tokenizer_config.json: chat_template is a list without a \"default\" template");
        }
        throw new TokenizerException("tokenizer_config.json: chat_template must be a string or a list of {name, template}");
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

    private static bool? OptionalBool(JsonElement root, string name) =>
        root.TryGetProperty(name, out var v) ? v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            JsonValueKind.Null => null,
            _ => throw new TokenizerException($"tokenizer_config.json: \"{name}\" must be true or false"),
        } : null;
}

/// <summary>
/// Loads a model folder's tokenizer: <c>tokenizer.json</c> (the Hugging Face tokenizers format), else a SentencePiece
/// <c>tokenizer.model</c>; special token names, BOS/EOS flags and the chat template come from tokenizer_config.json.
/// Every problem is a <see cref="TokenizerException"/> naming the file, so the API can check a model at submit time.
/// </summary>
public static class TokenizerLoader
{
    /// <param name="defaultChatTemplate">The chat format for models whose tokenizer_config.json has no chat_template
    /// (one of <see cref="ChatTemplate.Names"/>).</param>
    public static ITokenizer Load(string modelDir, string defaultChatTemplate = ChatTemplate.ChatMl)
    {
        var config = TokenizerConfig.Read(modelDir);
        var template = config.ChatTemplate is { } jinja ? ChatTemplate.Detect(jinja)
            : ChatTemplate.Named(defaultChatTemplate, addBos: config.AddBosToken ?? true);
        var tokenizerJson = Path.Combine(modelDir, "tokenizer.json");
        if (File.Exists(tokenizerJson))
        {
            var hf = HfTokenizer.FromFile(tokenizerJson, config.BosToken, config.EosToken, config.PadToken);
            hf.ChatTemplate = template;
            return hf;
        }
        var model = Path.Combine(modelDir, "tokenizer.model");
        if (File.Exists(model))
        {
            var sp = SentencePieceTokenizer.FromFile(model, config.BosToken, config.EosToken, config.PadToken,
                config.AddBosToken, config.AddEosToken);
            sp.ChatTemplate = template;
            return sp;
        }
        throw new TokenizerException(
            $"no tokenizer in {modelDir}: neither tokenizer.json (Hugging Face tokenizers) nor tokenizer.model (SentencePiece)");
    }
}
