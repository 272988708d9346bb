using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Tests.Tokenizers;

/// <summary>NFC/NFD as tokenizer.json normalizers; expected values come from Python's unicodedata (Unicode 14).</summary>
public sealed class NormalizerTests
{
    private static HfTokenizer WithNormalizer(string type) => HfTokenizer.FromJson(new JsonObject
    {
        ["normalizer"] = new JsonObject { ["type"] = type },
        ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = new JsonObject { ["a"] = 0 }, ["merges"] = new JsonArray() },
    }.ToJsonString());

    private static readonly HfTokenizer Nfc = WithNormalizer("NFC");
    private static readonly HfTokenizer Nfd = WithNormalizer("NFD");

    private static string Normalize(HfTokenizer t, string s) => string.Concat(t.PreTokenize(s));

    [Theory]
    [InlineData("\u1100\u1161\u11A8", "\uAC01", "\u1100\u1161\u11A8")]
    [InlineData("\uAC01", "\uAC01", "\u1100\u1161\u11A8")]
    [InlineData("e\u0302\u0323", "\u1EC7", "e\u0323\u0302")]
    [InlineData("e\u0323\u0302", "\u1EC7", "e\u0323\u0302")]
    [InlineData("\u212B", "\u00C5", "A\u030A")]
    [InlineData("\u2126", "\u03A9", "\u03A9")]
    [InlineData("\u0958", "\u0915\u093C", "\u0915\u093C")]
    [InlineData("\u0344", "\u0308\u0301", "\u0308\u0301")]
    [InlineData("a\u0301\u0301", "\u00E1\u0301", "a\u0301\u0301")]
    [InlineData("a\u0328\u0301", "\u0105\u0301", "a\u0328\u0301")]
    [InlineData("\u0B92\u0BD7", "\u0B94", "\u0B92\u0BD7")]
    [InlineData("\U00011099\U000110BA", "\U0001109A", "\U00011099\U000110BA")]
    [InlineData("\u0301a", "\u0301a", "\u0301a")]
    [InlineData("Vie\u0323\u0302t Nam", "Vi\u1EC7t Nam", "Vie\u0323\u0302t Nam")]
    [InlineData("\u1100\u1161\u11A8\u11A8", "\uAC01\u11A8", "\u1100\u1161\u11A8\u11A8")]
    [InlineData("\uAC00\u11A8", "\uAC01", "\u1100\u1161\u11A8")]
    [InlineData("\u0B47\u0300\u0B3E", "\u0B47\u0300\u0B3E", "\u0B47\u0300\u0B3E")]
    [InlineData("\u05D0\u05B7\u05BC", "\u05D0\u05B7\u05BC", "\u05D0\u05B7\u05BC")]
    [InlineData("\u01D5", "\u01D5", "U\u0308\u0304")]
    [InlineData("\u00C5\u0301", "\u01FA", "A\u030A\u0301")]
    [InlineData("plain ascii é", "plain ascii é", "plain ascii e\u0301")]
    public void Matches_unicodedata(string input, string nfc, string nfd)
    {
        Assert.Equal(nfc, Normalize(Nfc, input));
        Assert.Equal(nfd, Normalize(Nfd, input));
    }

    [Theory]
    [InlineData("NFC", "6e0aaa17a82be5b6f410942f1f99ae77832fb630e98780c6eaf6779ab278235d")]
    [InlineData("NFD", "e47f86d7e3d5f5990095fdb2c04515348d94089ee40333d9c45f403bfe89014b")]
    public void Every_code_point_matches_unicodedata(string form, string expectedSha256)
    {
        // sha256 over normalize(chr(c)) + "\0" for every scalar value, as computed with Python's unicodedata.
        var t = form == "NFC" ? Nfc : Nfd;
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        for (var c = 0; c < 0x110000; c++)
        {
            if (c is >= 0xD800 and <= 0xDFFF) continue;
            hash.AppendData(Encoding.UTF8.GetBytes(Normalize(t, char.ConvertFromUtf32(c))));
            hash.AppendData([0]);
        }
        Assert.Equal(expectedSha256, Convert.ToHexStringLower(hash.GetHashAndReset()));
    }

    [Fact]
    public void Unsupported_normalizers_are_named()
    {
        var e = Assert.Throws<TokenizerException>(() => WithNormalizer("NFKC"));
        Assert.Contains("normalizer \"NFKC\" is not supported", e.Message);
    }
}
