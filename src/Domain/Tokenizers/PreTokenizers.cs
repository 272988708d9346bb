using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace FineTune.Domain.Tokenizers;

/// <summary>A pre-token; <paramref name="AtStart"/>: it begins at offset 0 of the original text (Metaspace's
/// <c>prepend_scheme: first</c> prepends ▁ to that piece only).</summary>
internal readonly record struct Piece(string Text, bool AtStart);

/// <summary>One step of tokenizers' pre-tokenization: each piece is split further (empty pieces are dropped by
/// the caller, as <c>PreTokenizedString::split</c> does).</summary>
internal abstract class PreTokenizer
{
    public abstract void Split(string piece, bool atStart, List<Piece> output);

    public static PreTokenizer? FromJson(JsonElement el)
    {
        if (el.ValueKind == JsonValueKind.Null) return null;
        var type = Json.Type(el, "pre_tokenizer");
        switch (type)
        {
            case "ByteLevel":
                return new ByteLevelPreTokenizer(Json.Bool(el, "add_prefix_space", true), Json.Bool(el, "use_regex", true));
            case "Split":
                return SplitPreTokenizer.FromSplitJson(el);
            case "Digits":
                return new SplitPreTokenizer(new Regex(@"\p{N}", RegexOptions.CultureInvariant),
                    Json.Bool(el, "individual_digits", false) ? SplitBehavior.Isolated : SplitBehavior.Contiguous, false);
            case "Metaspace":
            {
                var (replacement, scheme, split) = MetaspacePreTokenizer.ReadOptions(el, "pre_tokenizer");
                return new MetaspacePreTokenizer(replacement, scheme, split);
            }
            case "Sequence":
                if (!el.TryGetProperty("pretokenizers", out var list) || list.ValueKind != JsonValueKind.Array)
                    throw new TokenizerException("tokenizer.json: Sequence pre_tokenizer has no \"pretokenizers\" array");
                return new SequencePreTokenizer([.. list.EnumerateArray().Select(p => FromJson(p)
                    ?? throw new TokenizerException("tokenizer.json: null inside a Sequence pre_tokenizer"))]);
            default:
                throw new TokenizerException(
                    $"tokenizer.json: the pre_tokenizer \"{type}\" is not supported (supported: ByteLevel, Split, Digits, Metaspace, Sequence)");
        }
    }

    public static List<string> Run(PreTokenizer? p, string text, bool atStart = true)
    {
        // tokenizers drops empty splits before pre-tokenizing, so "" never becomes a prefix space.
        if (text.Length == 0) return [];
        if (p is null) return [text];
        var output = new List<Piece>();
        p.Split(text, atStart, output);
        return [.. output.Where(x => x.Text.Length > 0).Select(x => x.Text)];
    }
}

internal sealed class SequencePreTokenizer(PreTokenizer[] steps) : PreTokenizer
{
    public override void Split(string piece, bool atStart, List<Piece> output)
    {
        List<Piece> pieces = [new(piece, atStart)];
        foreach (var step in steps)
        {
            var next = new List<Piece>();
            foreach (var p in pieces) step.Split(p.Text, p.AtStart, next);
            next.RemoveAll(s => s.Text.Length == 0);
            pieces = next;
        }
        output.AddRange(pieces);
    }
}

internal enum PrependScheme { Always, Never, First }

/// <summary>
/// SentencePiece-style pre-tokenization: spaces become ▁ (U+2581), a ▁ is prepended (always, never, or only to the
/// piece at the very start of the text), then the piece is split before each ▁ unless <c>split</c> is false.
/// </summary>
internal sealed class MetaspacePreTokenizer(char replacement, PrependScheme scheme, bool split) : PreTokenizer
{
    private readonly SplitPreTokenizer _splitter = new(
        new Regex(Regex.Escape(replacement.ToString()), RegexOptions.CultureInvariant), SplitBehavior.MergedWithNext, false);

    public override void Split(string piece, bool atStart, List<Piece> output)
    {
        var s = piece.Replace(' ', replacement);
        var prepend = scheme == PrependScheme.Always || (scheme == PrependScheme.First && atStart);
        if (prepend && !s.StartsWith(replacement)) s = replacement + s;
        if (split) _splitter.Split(s, atStart, output);
        else output.Add(new Piece(s, atStart));
    }

    /// <summary>Options as tokenizers reads them: <c>prepend_scheme</c> (default always), the older
    /// <c>add_prefix_space: false</c> meaning never, <c>split</c> (default true).</summary>
    public static (char Replacement, PrependScheme Scheme, bool Split) ReadOptions(JsonElement el, string what)
    {
        var replacement = Json.String(el, "replacement") is { Length: 1 } r ? r[0]
            : throw new TokenizerException($"tokenizer.json: Metaspace {what} needs a one-character \"replacement\"");
        var scheme = Json.String(el, "prepend_scheme") switch
        {
            null or "always" => PrependScheme.Always,
            "never" => PrependScheme.Never,
            "first" => PrependScheme.First,
            var other => throw new TokenizerException($"tokenizer.json: Metaspace prepend_scheme \"{other}\" is not known"),
        };
        if (el.TryGetProperty("add_prefix_space", out var add) && add.ValueKind == JsonValueKind.False)
        {
            if (scheme != PrependScheme.Never && Json.String(el, "prepend_scheme") is not null)
                throw new TokenizerException("tokenizer.json: Metaspace add_prefix_space does not match prepend_scheme");
            scheme = PrependScheme.Never;
        }
        return (replacement, scheme, Json.Bool(el, "split", true));
    }
}

internal sealed class ByteLevelPreTokenizer(bool addPrefixSpace, bool useRegex) : PreTokenizer
{
    // GPT-2's pattern, as tokenizers' ByteLevel uses it.
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    private static readonly Regex Gpt2 = new(Gpt2Pattern, RegexOptions.Compiled | RegexOptions.CultureInvariant);

    private static readonly SplitPreTokenizer Gpt2Split = new(Gpt2, SplitBehavior.Isolated, false);

    public override void Split(string piece, bool atStart, List<Piece> output)
    {
        if (addPrefixSpace && !piece.StartsWith(' ')) piece = " " + piece;
        if (!useRegex)
        {
            output.Add(new Piece(ByteLevelAlphabet.Encode(piece), atStart));
            return;
        }
        var pieces = new List<Piece>();
        Gpt2Split.Split(piece, atStart, pieces);
        foreach (var p in pieces) output.Add(p with { Text = ByteLevelAlphabet.Encode(p.Text) });
    }
}

internal enum SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous }

internal sealed class SplitPreTokenizer(Regex regex, SplitBehavior behavior, bool invert) : PreTokenizer
{
    public static SplitPreTokenizer FromSplitJson(JsonElement el)
    {
        if (!el.TryGetProperty("pattern", out var pattern) || pattern.ValueKind != JsonValueKind.Object)
            throw new TokenizerException("tokenizer.json: Split pre_tokenizer has no \"pattern\" object");
        string regex;
        if (pattern.TryGetProperty("Regex", out var r) && r.ValueKind == JsonValueKind.String) regex = r.GetString()!;
        else if (pattern.TryGetProperty("String", out var s) && s.ValueKind == JsonValueKind.String) regex = Regex.Escape(s.GetString()!);
        else throw new TokenizerException("tokenizer.json: Split pattern must be {\"Regex\": ...} or {\"String\": ...}");

        var behaviorName = Json.String(el, "behavior") ?? "Isolated";
        if (!Enum.TryParse<SplitBehavior>(behaviorName, out var behavior))
            throw new TokenizerException($"tokenizer.json: Split behavior \"{behaviorName}\" is not known");
        Regex compiled;
        try
        {
            compiled = new Regex(regex, RegexOptions.Compiled | RegexOptions.CultureInvariant);
        }
        catch (ArgumentException e)
        {
            throw new TokenizerException($"tokenizer.json: the Split regex cannot be used here: {e.Message}", e);
        }
        return new SplitPreTokenizer(compiled, behavior, Json.Bool(el, "invert", false));
    }

    public override void Split(string piece, bool atStart, List<Piece> output)
    {
        if (piece.Length == 0) return;
        // (start, end, isMatch) covering the whole piece, as tokenizers' Pattern::find_matches.
        var parts = new List<(int Start, int End, bool Match)>();
        var prev = 0;
        foreach (var (start, end) in RegexSplitter.Matches(regex, piece))
        {
            if (prev != start) parts.Add((prev, start, false));
            parts.Add((start, end, true));
            prev = end;
        }
        if (prev != piece.Length) parts.Add((prev, piece.Length, false));
        if (invert) parts = parts.ConvertAll(p => (p.Start, p.End, !p.Match));

        var spans = new List<(int Start, int End)>();
        switch (behavior)
        {
            case SplitBehavior.Removed:
                spans.AddRange(parts.Where(p => !p.Match).Select(p => (p.Start, p.End)));
                break;
            case SplitBehavior.Isolated:
                spans.AddRange(parts.Select(p => (p.Start, p.End)));
                break;
            case SplitBehavior.MergedWithPrevious:
            {
                var previousMatch = false;
                foreach (var p in parts)
                {
                    if (p.Match && !previousMatch && spans.Count > 0) spans[^1] = (spans[^1].Start, p.End);
                    else spans.Add((p.Start, p.End));
                    previousMatch = p.Match;
                }
                break;
            }
            case SplitBehavior.MergedWithNext:
            {
                var previousMatch = false;
                for (var i = parts.Count - 1; i >= 0; i--)
                {
                    var p = parts[i];
                    if (p.Match && !previousMatch && spans.Count > 0) spans[^1] = (p.Start, spans[^1].End);
                    else spans.Add((p.Start, p.End));
                    previousMatch = p.Match;
                }
                spans.Reverse();
                break;
            }
            case SplitBehavior.Contiguous:
            {
                var previousMatch = false;
                foreach (var p in parts)
                {
                    if (p.Match == previousMatch && spans.Count > 0) spans[^1] = (spans[^1].Start, p.End);
                    else spans.Add((p.Start, p.End));
                    previousMatch = p.Match;
                }
                break;
            }
        }
        foreach (var (start, end) in spans)
            if (end > start) output.Add(new Piece(piece[start..end], atStart && start == 0));
    }
}

/// <summary>
/// Runs a regex with code-point semantics. tokenizers matches on Unicode scalars (Oniguruma over UTF-8) while .NET
/// matches UTF-16 units, where each half of a surrogate pair is category Cs: <c>\p{L}</c> would not match 𝐀 or
/// CJK extension B. Text with surrogates is therefore matched on a stand-in string where each supplementary
/// character is one BMP character of the same general category, and the match positions are mapped back.
/// Exact for patterns made of general categories, <c>\s</c>, <c>\w</c> and BMP literals, as the HF patterns are.
/// </summary>
internal static class RegexSplitter
{
    private static readonly char[] Placeholder = BuildPlaceholders();

    public static List<(int Start, int End)> Matches(Regex regex, string s)
    {
        var results = new List<(int, int)>();
        if (s.AsSpan().IndexOfAnyInRange('\uD800', '\uDFFF') < 0)
        {
            foreach (var m in regex.EnumerateMatches(s)) results.Add((m.Index, m.Index + m.Length));
            return results;
        }
        var mapped = new StringBuilder(s.Length);
        var origin = new List<int>(s.Length + 1);
        for (var i = 0; i < s.Length; i++)
        {
            origin.Add(i);
            if (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
            {
                mapped.Append(Placeholder[(int)CharUnicodeInfo.GetUnicodeCategory(s, i)]);
                i++;
            }
            else mapped.Append(s[i]);
        }
        origin.Add(s.Length);
        foreach (var m in regex.EnumerateMatches(mapped.ToString()))
            results.Add((origin[m.Index], origin[m.Index + m.Length]));
        return results;
    }

    private static char[] BuildPlaceholders()
    {
        var table = new char[32];
        Array.Fill(table, '\uFFFD');
        var found = new bool[32];
        for (int c = 0xA1; c <= 0xFFFD; c++)
        {
            if (c is >= 0xD800 and <= 0xDFFF) continue;
            var ch = (char)c;
            if (char.IsWhiteSpace(ch)) continue;
            var cat = (int)char.GetUnicodeCategory(ch);
            if (!found[cat]) { found[cat] = true; table[cat] = ch; }
        }
        return table;
    }
}

internal static class Json
{
    public static string Type(JsonElement el, string what)
    {
        if (el.ValueKind != JsonValueKind.Object || !el.TryGetProperty("type", out var t) || t.ValueKind != JsonValueKind.String)
            throw new TokenizerException($"tokenizer.json: {what} has no \"type\"");
        return t.GetString()!;
    }

    public static bool Bool(JsonElement el, string name, bool fallback) =>
        el.TryGetProperty(name, out var v) ? v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => fallback,
        } : fallback;

    public static string? String(JsonElement el, string name) =>
        el.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    public static int Int(JsonElement el, string name, int fallback) =>
        el.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i) && i >= 0 ? i : fallback;
}
