using System.Text;
using System.Text.Json.Nodes;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Tests.Tokenizers;

public sealed class HfTokenizerTests
{
    private const string Llama3Pattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    private const string Qwen2Pattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    // Merged tokens of the hand-built tokenizer; ids 0..255 are the byte tokens (id = byte value).
    private static readonly (string A, string B, string Result, int Id)[] Merges =
    [
        ("h", "e", "he", 256),
        ("l", "l", "ll", 257),
        ("he", "ll", "hell", 258),
        ("hell", "o", "hello", 259),
        ("Ġ", "w", "Ġw", 260),
        ("b", "c", "bc", 261),
        ("a", "b", "ab", 262),
        ("o", "r", "or", 263),
        ("Ġw", "or", "Ġwor", 264),
    ];

    private static JsonObject ByteVocab()
    {
        var vocab = new JsonObject();
        for (var b = 0; b < 256; b++) vocab[ByteLevelAlphabet.ByteToChar((byte)b).ToString()] = b;
        return vocab;
    }

    private static JsonObject AddedToken(int id, string content, bool special) => new()
    {
        ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
        ["normalized"] = false, ["special"] = special,
    };

    /// <summary>A GPT-2-style tokenizer.json with the merges above; <paramref name="arrayMerges"/> picks the
    /// ["a","b"] form instead of "a b".</summary>
    private static JsonObject HandBuilt(bool arrayMerges = false, bool ignoreMerges = false)
    {
        var vocab = ByteVocab();
        foreach (var m in Merges) vocab[m.Result] = m.Id;
        vocab["abc"] = 270;
        var merges = new JsonArray();
        foreach (var m in Merges)
            merges.Add(arrayMerges ? new JsonArray(m.A, m.B) : JsonValue.Create($"{m.A} {m.B}"));
        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(AddedToken(300, "<|eot|>", true), AddedToken(301, "[A]", false),
                AddedToken(302, "[A][B]", false), AddedToken(303, "<|bos|>", true)),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(
                    new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<|bos|>", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } },
                    new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<|eot|>", ["type_id"] = 0 } }),
                ["special_tokens"] = new JsonObject
                {
                    ["<|bos|>"] = new JsonObject { ["id"] = "<|bos|>", ["ids"] = new JsonArray(303), ["tokens"] = new JsonArray("<|bos|>") },
                    ["<|eot|>"] = new JsonObject { ["id"] = "<|eot|>", ["ids"] = new JsonArray(300), ["tokens"] = new JsonArray("<|eot|>") },
                },
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null,
                ["end_of_word_suffix"] = null, ["fuse_unk"] = false, ["byte_fallback"] = false,
                ["ignore_merges"] = ignoreMerges, ["vocab"] = vocab, ["merges"] = merges,
            },
        };
    }

    private static HfTokenizer Load(JsonObject json, string? bos = null, string? eos = null, string? pad = null) =>
        HfTokenizer.FromJson(json.ToJsonString(), bos, eos, pad);

    /// <summary>A byte-only vocabulary with the given pre-tokenizer and normalizer.</summary>
    private static HfTokenizer BytesOnly(JsonNode? preTokenizer, JsonNode? normalizer = null)
    {
        var json = HandBuilt();
        json["pre_tokenizer"] = preTokenizer;
        json["normalizer"] = normalizer;
        json["model"]!["vocab"] = ByteVocab();
        json["model"]!["merges"] = new JsonArray();
        json["added_tokens"] = new JsonArray();
        json["post_processor"] = null;
        return Load(json);
    }

    private static JsonObject SplitThenByteLevel(string pattern) => new()
    {
        ["type"] = "Sequence",
        ["pretokenizers"] = new JsonArray(
            new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = pattern }, ["behavior"] = "Isolated", ["invert"] = false },
            new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = false }),
    };

    /// <summary>Byte-level pieces back to readable text.</summary>
    private static string[] Readable(IEnumerable<string> pieces) =>
        [.. pieces.Select(p => Encoding.UTF8.GetString(p.Select(c => ByteLevelAlphabet.TryCharToByte(c, out var b) ? b : throw new InvalidOperationException($"{c}")).ToArray()))];

    [Fact]
    public void Byte_level_table_is_gpt2s()
    {
        Assert.Equal('Ġ', ByteLevelAlphabet.ByteToChar((byte)' '));
        Assert.Equal('Ċ', ByteLevelAlphabet.ByteToChar((byte)'\n'));
        Assert.Equal('ĉ', ByteLevelAlphabet.ByteToChar((byte)'\t'));
        Assert.Equal('Ā', ByteLevelAlphabet.ByteToChar(0));
        Assert.Equal('A', ByteLevelAlphabet.ByteToChar((byte)'A'));
        Assert.Equal('ġ', ByteLevelAlphabet.ByteToChar(0x7F));
        Assert.Equal('ł', ByteLevelAlphabet.ByteToChar(0xA0));
        Assert.Equal('Ń', ByteLevelAlphabet.ByteToChar(0xAD));
        Assert.Equal('¡', ByteLevelAlphabet.ByteToChar(0xA1));
        Assert.Equal(256, Enumerable.Range(0, 256).Select(b => ByteLevelAlphabet.ByteToChar((byte)b)).Distinct().Count());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Merges_apply_by_rank_in_both_file_forms(bool arrayMerges)
    {
        var t = Load(HandBuilt(arrayMerges));
        // hello: he, ll, hell, hello. Ġworld: Ġw (rank 4), or (7), Ġwor (8), then l, d stay bytes.
        Assert.Equal([259, 264, 108, 100], t.Encode("hello world"));
        // Lowest rank first, not left to right: b c (5) before a b (6).
        Assert.Equal([97, 261], t.Encode("abc"));
        // Equal ranks: the leftmost pair merges first.
        Assert.Equal([257, 108], t.Encode("lll"));
        // Each pre-token is merged on its own: the space starts the second piece.
        Assert.Equal([256, 32, 256], t.Encode("he he"));
    }

    [Fact]
    public void Ignore_merges_takes_whole_words_from_the_vocab()
    {
        Assert.Equal([97, 261], Load(HandBuilt()).Encode("abc"));
        Assert.Equal([270], Load(HandBuilt(ignoreMerges: true)).Encode("abc"));
    }

    [Fact]
    public void Added_tokens_are_found_inside_text_longest_first()
    {
        var t = Load(HandBuilt());
        Assert.Equal([259, 300, 302, 301, 99], t.Encode("hello<|eot|>[A][B][A]c"));
        // The text on each side is pre-tokenized separately: "he" alone merges even without a leading space.
        Assert.Equal([256, 301, 256], t.Encode("he[A]he"));
        Assert.Equal([300, 300], t.Encode("<|eot|><|eot|>"));
        Assert.Equal([60, 124, 101, 111, 116, 124], t.Encode("<|eot|"));
    }

    [Fact]
    public void Post_processor_adds_template_tokens_only_on_request()
    {
        var t = Load(HandBuilt(), bos: "<|bos|>", eos: "<|eot|>");
        Assert.Equal([259], t.Encode("hello"));
        Assert.Equal([303, 259, 300], t.Encode("hello", addSpecialTokens: true));
        Assert.Equal(303, t.BosId);
        Assert.Equal(300, t.EosId);
        Assert.Equal(300, t.PadId); // no pad token: EOS
        Assert.False(t.HasPadToken);
    }

    [Fact]
    public void Decode_maps_bytes_back_and_can_skip_special_tokens()
    {
        var t = Load(HandBuilt());
        int[] ids = [303, 259, 264, 108, 100, 300, 301];
        Assert.Equal("<|bos|>hello world<|eot|>[A]", t.Decode(ids));
        Assert.Equal("hello world[A]", t.Decode(ids, skipSpecialTokens: true));
        // Ids without a token are skipped, as tokenizers does.
        Assert.Equal("hello", t.Decode([259, 9999, -1]));
        // A multi-byte character split over tokens joins back.
        Assert.Equal("é", t.Decode([195, 169]));
        Assert.Equal("\uFFFD", t.Decode([195]));
    }

    [Fact]
    public void Vocab_size_and_lookups_cover_added_tokens()
    {
        var t = Load(HandBuilt());
        Assert.Equal(304, t.VocabSize);
        Assert.Equal(300, t.TokenToId("<|eot|>"));
        Assert.Equal(259, t.TokenToId("hello"));
        Assert.Null(t.TokenToId("nope"));
        Assert.Equal("Ġwor", t.IdToToken(264));
    }

    [Fact]
    public void Gpt2_byte_level_regex_splits()
    {
        var t = BytesOnly(new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true });
        Assert.Equal(["Hello", " world", " ", " 123", " 456789", " don", "'t"],
            Readable(t.PreTokenize("Hello world  123 456789 don't")));
        Assert.Equal(["ĠHello"], t.PreTokenize(" Hello"));
    }

    [Fact]
    public void Byte_level_add_prefix_space()
    {
        var t = BytesOnly(new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["use_regex"] = true });
        Assert.Equal([" Hi", " there"], Readable(t.PreTokenize("Hi there")));
        Assert.Equal([" Hi"], Readable(t.PreTokenize(" Hi")));
        Assert.Empty(t.Encode(""));
        // The prefix space is added to each piece between added tokens, as tokenizers splits there first.
        var withAdded = HandBuilt();
        withAdded["pre_tokenizer"]!["add_prefix_space"] = true;
        Assert.Equal([32, 259, 300, 32, 256], Load(withAdded).Encode("hello<|eot|>he"));
        var noRegex = BytesOnly(new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false });
        Assert.Equal(["a b  c"], Readable(noRegex.PreTokenize("a b  c")));
    }

    [Fact]
    public void Llama3_regex_splits()
    {
        var t = BytesOnly(SplitThenByteLevel(Llama3Pattern));
        Assert.Equal(["Hello", " world", " ", " ", "123", " ", "456", "789", " don", "'t"],
            Readable(t.PreTokenize("Hello world  123 456789 don't")));
        Assert.Equal(["I", "'M", " fine", ".\n\n", "Ok", "\n", " ", " x"], Readable(t.PreTokenize("I'M fine.\n\nOk\n  x")));
        Assert.Equal(["a", "\n\n", "b", "   "], Readable(t.PreTokenize("a\n\nb   ")));
    }

    [Fact]
    public void Qwen2_regex_splits_digits_one_by_one()
    {
        var t = BytesOnly(SplitThenByteLevel(Qwen2Pattern), new JsonObject { ["type"] = "NFC" });
        Assert.Equal(["Hello", " world", " ", " ", "1", "2", "3", " ", "4", "5", "6", "7", "8", "9", " don", "'t"],
            Readable(t.PreTokenize("Hello world  123 456789 don't")));
    }

    [Fact]
    public void Regex_classes_see_supplementary_characters_as_one_code_point()
    {
        // 𝐀𝐁 (U+1D400, U+1D401) are letters; 😀 is a symbol; 𝟏 (U+1D7CF) is a digit.
        var t = BytesOnly(SplitThenByteLevel(Llama3Pattern));
        Assert.Equal(["𝐀𝐁c", " 😀", " ", "𝟏𝟏𝟏", "𝟏"], Readable(t.PreTokenize("𝐀𝐁c 😀 𝟏𝟏𝟏𝟏")));
        var gpt2 = BytesOnly(new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true });
        Assert.Equal(["𠀀𠀁", " 👍🏽!"], Readable(gpt2.PreTokenize("𠀀𠀁 👍🏽!")));
    }

    [Fact]
    public void Split_behaviors_follow_tokenizers()
    {
        JsonObject Split(string behavior, bool invert = false) => new()
        {
            ["type"] = "Split", ["pattern"] = new JsonObject { ["String"] = "-" }, ["behavior"] = behavior, ["invert"] = invert,
        };
        const string text = "a-b--c-";
        Assert.Equal(["a", "b", "c"], BytesOnly(Split("Removed")).PreTokenize(text));
        Assert.Equal(["a", "-", "b", "-", "-", "c", "-"], BytesOnly(Split("Isolated")).PreTokenize(text));
        Assert.Equal(["a-", "b-", "-", "c-"], BytesOnly(Split("MergedWithPrevious")).PreTokenize(text));
        Assert.Equal(["a", "-b", "-", "-c", "-"], BytesOnly(Split("MergedWithNext")).PreTokenize(text));
        Assert.Equal(["a", "-", "b", "--", "c", "-"], BytesOnly(Split("Contiguous")).PreTokenize(text));
        Assert.Equal(["-", "-", "-", "-"], BytesOnly(Split("Removed", invert: true)).PreTokenize(text));
    }

    [Fact]
    public void Digits_pre_tokenizer()
    {
        var individual = BytesOnly(new JsonObject { ["type"] = "Digits", ["individual_digits"] = true });
        Assert.Equal(["a", "1", "2", "b"], individual.PreTokenize("a12b"));
        var grouped = BytesOnly(new JsonObject { ["type"] = "Digits", ["individual_digits"] = false });
        Assert.Equal(["a", "12", "b"], grouped.PreTokenize("a12b"));
    }

    [Fact]
    public void Nfc_normalizer_composes_before_byte_encoding()
    {
        var byteLevel = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true };
        Assert.Equal([0xC3, 0xA9], BytesOnly(byteLevel, new JsonObject { ["type"] = "NFC" }).Encode("e\u0301"));
        Assert.Equal([(int)'e', 0xCC, 0x81], BytesOnly(byteLevel.DeepClone()).Encode("e\u0301"));
    }

    [Fact]
    public void Byte_fallback_and_unk_in_a_non_byte_level_bpe()
    {
        var vocab = new JsonObject { ["<unk>"] = 0, ["a"] = 1, ["b"] = 2, ["ab"] = 3, ["<0xC3>"] = 4, ["<0xA9>"] = 5 };
        JsonObject Json(bool byteFallback) => new()
        {
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["unk_token"] = "<unk>", ["fuse_unk"] = true, ["byte_fallback"] = byteFallback,
                ["vocab"] = vocab.DeepClone(), ["merges"] = new JsonArray("a b"),
            },
        };
        Assert.Equal([3, 4, 5, 1], Load(Json(byteFallback: true)).Encode("abéa"));
        Assert.Equal([3, 0, 1], Load(Json(byteFallback: false)).Encode("abxyéa"));
    }

    [Theory]
    [InlineData("{not json", "not valid JSON")]
    [InlineData("[]", "top level is not an object")]
    [InlineData("{}", "no \"model\"")]
    [InlineData("""{"model":{"type":"WordPiece","vocab":{}}}""", "model type \"WordPiece\" is not supported")]
    [InlineData("""{"model":{"type":"Unigram","vocab":[]}}""", "SentencePiece Unigram tokenizers are not supported yet")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]}}""", "not in the vocab")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":["a"]}}""", "not two tokens")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"pre_tokenizer":{"type":"Metaspace","replacement":"▁","prepend_scheme":"sometimes"}}""", "prepend_scheme \"sometimes\" is not known")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"pre_tokenizer":{"type":"WhitespaceSplit"}}""", "pre_tokenizer \"WhitespaceSplit\" is not supported")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"normalizer":{"type":"Replace","pattern":{"String":" "}}}""", "Replace normalizer has no \"content\"")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"decoder":{"type":"Strip","content":"ab","start":1,"stop":0}}""", "one-character \"content\"")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"normalizer":{"type":"Lowercase"}}""", "normalizer \"Lowercase\" is not supported")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"decoder":{"type":"WordPiece"}}""", "decoder \"WordPiece\" is not supported")]
    [InlineData("""{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"pre_tokenizer":{"type":"Split","pattern":{"Regex":"a++"},"behavior":"Isolated"}}""", "Split regex cannot be used")]
    public void Bad_or_unsupported_files_throw_a_clear_error(string json, string message)
    {
        var e = Assert.Throws<TokenizerException>(() => HfTokenizer.FromJson(json));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void Special_token_names_must_exist()
    {
        var e = Assert.Throws<TokenizerException>(() => Load(HandBuilt(), eos: "</s>"));
        Assert.Contains("eos_token \"</s>\"", e.Message);
    }
}
