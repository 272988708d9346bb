using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// tokenizer.json normalizers, as tokenizers applies them to each piece of text between added tokens. The
/// SentencePiece-style ones (Prepend, Replace) are what Llama 2, Mistral and TinyLlama ship:
/// <c>Sequence[Prepend("▁"), Replace(" ", "▁")]</c>.
/// </summary>
internal static class Normalizers
{
    public const string Supported = "NFC, NFD, Prepend, Replace, Strip, Sequence";

    public static Func<string, string>? FromJson(JsonElement el)
    {
        if (el.ValueKind is JsonValueKind.Undefined or JsonValueKind.Null) return null;
        var type = Json.Type(el, "normalizer");
        switch (type)
        {
            case "Sequence":
            {
                if (!el.TryGetProperty("normalizers", out var list) || list.ValueKind != JsonValueKind.Array)
                    throw new TokenizerException("tokenizer.json: Sequence normalizer has no \"normalizers\" array");
                var steps = list.EnumerateArray().Select(FromJson).OfType<Func<string, string>>().ToArray();
                return steps.Length switch
                {
                    0 => null,
                    1 => steps[0],
                    _ => s => steps.Aggregate(s, (acc, step) => step(acc)),
                };
            }
            case "NFC": return UnicodeNormalizer.Nfc;
            case "NFD": return UnicodeNormalizer.Nfd;
            case "Prepend":
            {
                var prepend = Json.String(el, "prepend")
                              ?? throw new TokenizerException("tokenizer.json: Prepend normalizer has no \"prepend\" string");
                // tokenizers prepends only to non-empty text.
                return s => s.Length == 0 ? s : prepend + s;
            }
            case "Replace":
            {
                var replace = Replacement.FromJson(el, "normalizer");
                return replace.Apply;
            }
            case "Strip":
            {
                bool left = Json.Bool(el, "strip_left", true), right = Json.Bool(el, "strip_right", true);
                return s => StripWhitespace(s, left, right);
            }
            default:
                throw new TokenizerException(
                    $"tokenizer.json: the normalizer \"{type}\" is not supported (supported: none, {Supported})");
        }
    }

    // Rust's char::is_whitespace is the White_Space property, which char.IsWhiteSpace also follows.
    private static string StripWhitespace(string s, bool left, bool right)
    {
        int start = 0, end = s.Length;
        if (left) while (start < end && char.IsWhiteSpace(s[start])) start++;
        if (right) while (end > start && char.IsWhiteSpace(s[end - 1])) end--;
        return s[start..end];
    }
}

/// <summary>The <c>pattern</c> + <c>content</c> of a Replace normalizer or decoder: every match of a literal
/// ({"String": ...}) or a regex ({"Regex": ...}) is replaced by the content.</summary>
internal sealed class Replacement
{
    private readonly string? _literal;
    private readonly Regex? _regex;
    private readonly string _content;

    private Replacement(string? literal, Regex? regex, string content) => (_literal, _regex, _content) = (literal, regex, content);

    public static Replacement FromJson(JsonElement el, string what)
    {
        var content = Json.String(el, "content") ?? throw new TokenizerException($"tokenizer.json: Replace {what} has no \"content\"");
        if (!el.TryGetProperty("pattern", out var pattern) || pattern.ValueKind != JsonValueKind.Object)
            throw new TokenizerException($"tokenizer.json: Replace {what} has no \"pattern\" object");
        if (Json.String(pattern, "String") is { } literal)
        {
            if (literal.Length == 0) throw new TokenizerException($"tokenizer.json: Replace {what} has an empty pattern");
            return new Replacement(literal, null, content);
        }
        if (Json.String(pattern, "Regex") is { } regex)
        {
            try
            {
                return new Replacement(null, new Regex(regex, RegexOptions.CultureInvariant), content);
            }
            catch (ArgumentException e)
            {
                throw new TokenizerException($"tokenizer.json: the Replace regex cannot be used here: {e.Message}", e);
            }
        }
        throw new TokenizerException($"tokenizer.json: Replace {what} pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}");
    }

    public string Apply(string s)
    {
        if (_literal is not null) return s.Replace(_literal, _content, StringComparison.Ordinal);
        var matches = RegexSplitter.Matches(_regex!, s);
        if (matches.Count == 0) return s;
        var sb = new StringBuilder(s.Length);
        var last = 0;
        foreach (var (start, end) in matches)
        {
            sb.Append(s, last, start - last).Append(_content);
            last = end;
        }
        return sb.Append(s, last, s.Length - last).ToString();
    }
}
