using System.Globalization;
using System.Text;
using System.Text.Json;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// A tokenizer.json decoder: tokenizers' <c>decode_chain</c>, which maps the list of token strings to a new list;
/// the decoded text is the concatenation of the last list. Byte-level tokenizers use ByteLevel; SentencePiece-style
/// ones <c>Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]</c> or Metaspace.
/// </summary>
internal abstract class Decoder
{
    public const string Supported = "ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence";

    public abstract List<string> DecodeChain(List<string> tokens);

    public static Decoder? FromJson(JsonElement el)
    {
        if (el.ValueKind is JsonValueKind.Undefined or JsonValueKind.Null) return null;
        var type = Json.Type(el, "decoder");
        switch (type)
        {
            case "ByteLevel": return new ByteLevelDecoder();
            case "ByteFallback": return new ByteFallbackDecoder();
            case "Fuse": return new FuseDecoder();
            case "Replace":
            {
                var replacement = Replacement.FromJson(el, "decoder");
                return new MapDecoder(replacement.Apply);
            }
            case "Strip":
            {
                var content = Json.String(el, "content") is { Length: 1 } c ? c[0]
                    : throw new TokenizerException("tokenizer.json: Strip decoder needs a one-character \"content\"");
                return new StripDecoder(content, Json.Int(el, "start", 0), Json.Int(el, "stop", 0));
            }
            case "Metaspace":
            {
                var (replacement, scheme, _) = MetaspacePreTokenizer.ReadOptions(el, "decoder");
                return new MetaspaceDecoder(replacement, scheme != PrependScheme.Never);
            }
            case "Sequence":
            {
                if (!el.TryGetProperty("decoders", out var list) || list.ValueKind != JsonValueKind.Array)
                    throw new TokenizerException("tokenizer.json: Sequence decoder has no \"decoders\" array");
                return new SequenceDecoder([.. list.EnumerateArray().Select(d => FromJson(d)
                    ?? throw new TokenizerException("tokenizer.json: null inside a Sequence decoder"))]);
            }
            default:
                throw new TokenizerException($"tokenizer.json: the decoder \"{type}\" is not supported (supported: {Supported})");
        }
    }
}

internal sealed class SequenceDecoder(Decoder[] steps) : Decoder
{
    public override List<string> DecodeChain(List<string> tokens) => steps.Aggregate(tokens, (acc, d) => d.DecodeChain(acc));
}

internal sealed class MapDecoder(Func<string, string> map) : Decoder
{
    public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(t => map(t));
}

internal sealed class FuseDecoder : Decoder
{
    public override List<string> DecodeChain(List<string> tokens) => [string.Concat(tokens)];
}

/// <summary>Byte-level characters back to bytes, all tokens at once, then lossy UTF-8; a token with a character
/// outside the byte table (an added token such as "&lt;|im_start|&gt;" is fine, one with a space is not) is taken as text.</summary>
internal sealed class ByteLevelDecoder : Decoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        var bytes = new List<byte>();
        foreach (var t in tokens)
        {
            var start = bytes.Count;
            var mapped = true;
            foreach (var c in t)
            {
                if (ByteLevelAlphabet.TryCharToByte(c, out var b)) bytes.Add(b);
                else { mapped = false; break; }
            }
            if (mapped) continue;
            bytes.RemoveRange(start, bytes.Count - start);
            bytes.AddRange(Encoding.UTF8.GetBytes(t));
        }
        return [Encoding.UTF8.GetString(bytes.ToArray())];
    }
}

/// <summary>Runs of &lt;0xNN&gt; tokens become their UTF-8 text; a run that is not valid UTF-8 becomes one U+FFFD per byte.</summary>
internal sealed class ByteFallbackDecoder : Decoder
{
    private static readonly UTF8Encoding Strict = new(false, throwOnInvalidBytes: true);

    public override List<string> DecodeChain(List<string> tokens)
    {
        var result = new List<string>(tokens.Count);
        var pending = new List<byte>();
        foreach (var token in tokens)
        {
            if (TryByte(token, out var b))
            {
                pending.Add(b);
                continue;
            }
            Flush();
            result.Add(token);
        }
        Flush();
        return result;

        void Flush()
        {
            if (pending.Count == 0) return;
            try { result.Add(Strict.GetString(pending.ToArray())); }
            catch (DecoderFallbackException) { for (var i = 0; i < pending.Count; i++) result.Add("\uFFFD"); }
            pending.Clear();
        }
    }

    public static bool TryByte(string token, out byte b)
    {
        b = 0;
        return token.Length == 6 && token.StartsWith("<0x", StringComparison.Ordinal) && token[5] == '>'
               && byte.TryParse(token.AsSpan(3, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out b);
    }
}

/// <summary>Removes up to <c>start</c> leading and <c>stop</c> trailing copies of one character from each token.</summary>
internal sealed class StripDecoder(char content, int start, int stop) : Decoder
{
    public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(token =>
    {
        var chars = token.EnumerateRunes().ToArray();
        var startCut = 0;
        for (var i = 0; i < Math.Min(start, chars.Length) && chars[i].Value == content; i++) startCut = i + 1;
        var stopCut = chars.Length;
        for (var i = 0; i < Math.Min(stop, chars.Length - startCut); i++)
        {
            var index = chars.Length - i - 1;
            if (chars[index].Value != content) break;
            stopCut = index;
        }
        return string.Concat(chars[startCut..stopCut].Select(r => r.ToString()));
    });
}

/// <summary>▁ back to spaces; in the first token every ▁ is dropped when the pre-tokenizer prepends one (as tokenizers does).</summary>
internal sealed class MetaspaceDecoder(char replacement, bool prepends) : Decoder
{
    public override List<string> DecodeChain(List<string> tokens)
    {
        var result = new List<string>(tokens.Count);
        for (var i = 0; i < tokens.Count; i++)
        {
            var sb = new StringBuilder(tokens[i].Length);
            foreach (var c in tokens[i])
            {
                if (c != replacement) sb.Append(c);
                else if (!(i == 0 && prepends)) sb.Append(' ');
            }
            result.Add(sb.ToString());
        }
        return result;
    }
}
