using System.Text.Json;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Tests.Tokenizers;

public sealed class TinyTokenizerTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("tiny-tok-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private HfTokenizer WriteAndLoad()
    {
        TinyTokenizer.WriteFiles(_dir);
        return (HfTokenizer)TokenizerLoader.Load(_dir);
    }

    [Fact]
    public void Files_load_back_with_the_expected_ids()
    {
        var t = WriteAndLoad();
        Assert.Equal(TinyTokenizer.VocabSize, t.VocabSize);
        Assert.Equal(259, TinyTokenizer.VocabSize);
        Assert.Equal(256, t.BosId);
        Assert.Equal(257, t.EosId);
        Assert.Equal(258, t.PadId);
        Assert.True(t.HasPadToken);
        Assert.Equal(256, t.TokenToId("<|begin_of_text|>"));
        Assert.Equal([104, 105, 32, 0xC3, 0xA9], t.Encode("hi é"));
        Assert.Equal([256, 104, 105], t.Encode("hi", addSpecialTokens: true));
        Assert.Equal([104, 257, 105], t.Encode("h<|end_of_text|>i"));
        Assert.Equal("hi", t.Decode([256, 104, 105, 257, 258], skipSpecialTokens: true));
        Assert.Equal("<|begin_of_text|>hi", t.Decode([256, 104, 105]));
    }

    [Fact]
    public void Files_are_hugging_face_shaped()
    {
        TinyTokenizer.WriteFiles(_dir);
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(_dir, "tokenizer.json")));
        var model = doc.RootElement.GetProperty("model");
        Assert.Equal("BPE", model.GetProperty("type").GetString());
        Assert.Equal(256, model.GetProperty("vocab").EnumerateObject().Count());
        Assert.Equal(32, model.GetProperty("vocab").GetProperty("Ġ").GetInt32());
        Assert.Equal(0, model.GetProperty("merges").GetArrayLength());
        Assert.Equal(3, doc.RootElement.GetProperty("added_tokens").GetArrayLength());
        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(_dir, "tokenizer_config.json")));
        Assert.Equal("<|end_of_text|>", config.RootElement.GetProperty("eos_token").GetString());
    }

    [Theory]
    [InlineData("")]
    [InlineData("Hello, world!")]
    [InlineData("  leading and trailing  ")]
    [InlineData("tabs\tand\nnew\r\nlines\n\n\n   runs      of spaces")]
    [InlineData("emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷")]
    [InlineData("漢字 かな カナ 한국어 中文")]
    [InlineData("Ελληνικά, русский, עברית, العربية")]
    [InlineData("combining e\u0301 and NFC é; 𝐀𝐁 𝟏𝟐 𠀀")]
    [InlineData("\u0000\u0001 control \u007f \u0085 \u00a0 \u2028 \ufeff")]
    [InlineData("don't I'M 123456789 <|not_special|>")]
    public void Any_text_round_trips(string text)
    {
        var t = WriteAndLoad();
        var ids = t.Encode(text);
        Assert.Equal(System.Text.Encoding.UTF8.GetByteCount(text), ids.Length);
        Assert.All(ids, id => Assert.InRange(id, 0, 255));
        Assert.Equal(text, t.Decode(ids));
        Assert.Equal(text, t.Decode(t.Encode(text, addSpecialTokens: true), skipSpecialTokens: true));
    }

    [Fact]
    public void Random_text_round_trips()
    {
        var t = WriteAndLoad();
        var rng = new Random(1234);
        for (var n = 0; n < 200; n++)
        {
            var sb = new System.Text.StringBuilder();
            var length = rng.Next(0, 40);
            for (var i = 0; i < length; i++)
            {
                int cp;
                do cp = rng.Next(4) == 0 ? rng.Next(0x10000, 0x110000) : rng.Next(0, 0x3000);
                while (cp is >= 0xD800 and <= 0xDFFF);
                sb.Append(char.ConvertFromUtf32(cp));
            }
            var text = sb.ToString();
            Assert.Equal(text, t.Decode(t.Encode(text)));
        }
    }

    [Fact]
    public void Loader_reads_token_names_as_strings_objects_or_null()
    {
        TinyTokenizer.WriteFiles(_dir);
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"),
            """{"bos_token": null, "eos_token": {"content": "<|end_of_text|>", "special": true}, "pad_token": "<|pad|>"}""");
        var t = TokenizerLoader.Load(_dir);
        Assert.Null(t.BosId);
        Assert.Equal(257, t.EosId);
        Assert.Equal(258, t.PadId);
    }

    [Fact]
    public void Loader_without_config_has_no_special_ids()
    {
        TinyTokenizer.WriteFiles(_dir);
        File.Delete(Path.Combine(_dir, "tokenizer_config.json"));
        var t = TokenizerLoader.Load(_dir);
        Assert.Null(t.BosId);
        Assert.Null(t.EosId);
        Assert.Equal(0, t.PadId);
        // The post-processor still adds BOS: it comes from tokenizer.json.
        Assert.Equal([256, 97], t.Encode("a", addSpecialTokens: true));
    }

    [Fact]
    public void Loader_errors_are_clear()
    {
        var e = Assert.Throws<TokenizerException>(() => TokenizerLoader.Load(_dir));
        Assert.Contains("neither tokenizer.json (Hugging Face tokenizers) nor tokenizer.model (SentencePiece)", e.Message);
        TinyTokenizer.WriteFiles(_dir);
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"), "{oops");
        Assert.Contains("tokenizer_config.json is not valid JSON", Assert.Throws<TokenizerException>(() => TokenizerLoader.Load(_dir)).Message);
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"), """{"eos_token": 5}""");
        Assert.Contains("\"eos_token\" must be", Assert.Throws<TokenizerException>(() => TokenizerLoader.Load(_dir)).Message);
    }
}
