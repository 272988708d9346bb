using System.Text.Json;
using System.Text.Json.Nodes;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// The tokenizer of the project's tiny demo model: byte-level BPE without merges, so every UTF-8 byte is one token
/// (id = byte value), plus three special tokens. Written in the real Hugging Face format, so the same files load with
/// the <c>tokenizers</c>/<c>transformers</c> libraries.
/// </summary>
public static class TinyTokenizer
{
    public const int VocabSize = 259;
    public const int BosId = 256;
    public const int EosId = 257;
    public const int PadId = 258;
    public const string BosToken = "<|begin_of_text|>";
    public const string EosToken = "<|end_of_text|>";
    public const string PadToken = "<|pad|>";

    public static void WriteFiles(string modelDir)
    {
        Directory.CreateDirectory(modelDir);
        var options = new JsonSerializerOptions { WriteIndented = true };
        File.WriteAllText(Path.Combine(modelDir, "tokenizer.json"), TokenizerJson().ToJsonString(options));
        File.WriteAllText(Path.Combine(modelDir, "tokenizer_config.json"), ConfigJson().ToJsonString(options));
    }

    private static (int Id, string Content)[] Specials => [(BosId, BosToken), (EosId, EosToken), (PadId, PadToken)];

    private static JsonObject TokenizerJson()
    {
        var vocab = new JsonObject();
        for (var b = 0; b < 256; b++) vocab[ByteLevelAlphabet.ByteToChar((byte)b).ToString()] = b;
        var added = new JsonArray();
        foreach (var (id, content) in Specials)
            added.Add(new JsonObject
            {
                ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            });
        return new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true,
            },
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(Special(BosToken, 0), Sequence("A", 0)),
                ["pair"] = new JsonArray(Special(BosToken, 0), Sequence("A", 0), Special(BosToken, 1), Sequence("B", 1)),
                ["special_tokens"] = new JsonObject
                {
                    [BosToken] = new JsonObject
                    {
                        ["id"] = BosToken, ["ids"] = new JsonArray(BosId), ["tokens"] = new JsonArray(BosToken),
                    },
                },
            },
            ["decoder"] = new JsonObject
            {
                ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true,
            },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null,
                ["end_of_word_suffix"] = null, ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false,
                ["vocab"] = vocab, ["merges"] = new JsonArray(),
            },
        };

        static JsonObject Special(string id, int typeId) =>
            new() { ["SpecialToken"] = new JsonObject { ["id"] = id, ["type_id"] = typeId } };
        static JsonObject Sequence(string id, int typeId) =>
            new() { ["Sequence"] = new JsonObject { ["id"] = id, ["type_id"] = typeId } };
    }

    private static JsonObject ConfigJson()
    {
        var decoder = new JsonObject();
        foreach (var (id, content) in Specials)
            decoder[id.ToString()] = new JsonObject
            {
                ["content"] = content, ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false,
                ["single_word"] = false, ["special"] = true,
            };
        return new JsonObject
        {
            ["added_tokens_decoder"] = decoder,
            ["bos_token"] = BosToken,
            ["eos_token"] = EosToken,
            ["pad_token"] = PadToken,
            ["clean_up_tokenization_spaces"] = false,
            ["model_max_length"] = 1_000_000,
            ["tokenizer_class"] = "PreTrainedTokenizerFast",
        };
    }
}
