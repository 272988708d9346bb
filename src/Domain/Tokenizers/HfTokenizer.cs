using System.Text;
using System.Text.Json;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// A Hugging Face <c>tokenizer.json</c> with a BPE model, encoding as the <c>tokenizers</c> library does: added tokens
/// are split out first (leftmost, longest), the rest is normalized, pre-tokenized and merged by BPE rank; the
/// post-processor adds BOS/EOS on request. Covers byte-level BPE (GPT-2, Llama 3, Qwen2) and SentencePiece-style BPE
/// with byte fallback (Llama 2, Mistral, TinyLlama: Prepend/Replace normalizers or a Metaspace pre-tokenizer,
/// <c>&lt;0xNN&gt;</c> byte tokens, ByteFallback/Fuse/Strip decoders).
/// </summary>
public sealed class HfTokenizer : ITokenizer
{
    private readonly BpeModel _model;
    private readonly AddedTokens _added;
    private readonly Func<string, string>? _normalization;
    private readonly PreTokenizer? _preTokenizer;
    private readonly PostProcessor? _postProcessor;
    private readonly Decoder? _decoder;

    private HfTokenizer(BpeModel model, AddedTokens added, Func<string, string>? normalization, PreTokenizer? preTokenizer,
        PostProcessor? postProcessor, Decoder? decoder, string? bosToken, string? eosToken, string? padToken)
    {
        _model = model;
        _added = added;
        _normalization = normalization;
        _preTokenizer = preTokenizer;
        _postProcessor = postProcessor;
        _decoder = decoder;
        VocabSize = Math.Max(model.MaxId, added.MaxId) + 1;
        BosId = Resolve(bosToken, "bos_token");
        EosId = Resolve(eosToken, "eos_token");
        var pad = Resolve(padToken, "pad_token");
        PadId = pad ?? EosId ?? BosId ?? 0;
        HasPadToken = pad is not null;

        int? Resolve(string? token, string what) => token is null ? null
            : TokenToId(token) ?? throw new TokenizerException($"the {what} \"{token}\" is not in the tokenizer's vocabulary");
    }

    /// <summary>Largest id + 1 over the vocab and the added tokens (the embedding rows the ids need).</summary>
    public int VocabSize { get; }
    public int? BosId { get; }
    public int? EosId { get; }
    /// <summary>The pad token's id; without one, EOS, then BOS, then 0 (padded positions are masked anyway).</summary>
    public int PadId { get; }
    public bool HasPadToken { get; }
    public ChatTemplate? ChatTemplate { get; internal set; }

    public static HfTokenizer FromFile(string tokenizerJsonPath, string? bosToken = null, string? eosToken = null,
        string? padToken = null)
    {
        string json;
        try
        {
            json = File.ReadAllText(tokenizerJsonPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new TokenizerException($"cannot read {tokenizerJsonPath}: {e.Message}", e);
        }
        return FromJson(json, bosToken, eosToken, padToken);
    }

    public static HfTokenizer FromJson(string json, string? bosToken = null, string? eosToken = null, string? padToken = null)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json, new JsonDocumentOptions { MaxDepth = 256 });
        }
        catch (JsonException e)
        {
            throw new TokenizerException($"tokenizer.json is not valid JSON: {e.Message}", e);
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new TokenizerException("tokenizer.json: the top level is not an object");
            if (!root.TryGetProperty("model", out var modelEl) || modelEl.ValueKind != JsonValueKind.Object)
                throw new TokenizerException("tokenizer.json has no \"model\"");
            // Files written by old versions may omit "type"; a vocab plus merges is then a BPE model.
            var modelType = Json.String(modelEl, "type") ?? (modelEl.TryGetProperty("merges", out _) ? "BPE" : null);
            if (modelType != "BPE")
                throw new TokenizerException(
                    $"tokenizer.json: the model type \"{modelType ?? "(none)"}\" is not supported (only BPE" +
                    (modelType is "Unigram" ? "; SentencePiece Unigram tokenizers are not supported yet)" : ")"));
            var model = BpeModel.FromJson(modelEl);

            var normalization = Normalizers.FromJson(root.TryGetProperty("normalizer", out var n) ? n : default);
            var pre = root.TryGetProperty("pre_tokenizer", out var p) ? PreTokenizer.FromJson(p) : null;
            var post = root.TryGetProperty("post_processor", out var pp) ? PostProcessor.FromJson(pp, model) : null;
            var decoder = Decoder.FromJson(root.TryGetProperty("decoder", out var d) ? d : default);
            var added = AddedTokens.FromJson(root.TryGetProperty("added_tokens", out var a) ? a : default, normalization);
            return new HfTokenizer(model, added, normalization, pre, post, decoder, bosToken, eosToken, padToken);
        }
    }

    public int[] Encode(string text, bool addSpecialTokens = false)
    {
        ArgumentNullException.ThrowIfNull(text);
        text = ReplaceLoneSurrogates(text);
        var ids = new List<int>();
        var rawOffset = 0;
        foreach (var (raw, rawId) in _added.Split(text, normalized: false))
        {
            var rawAtStart = rawOffset == 0;
            rawOffset += raw.Length;
            if (rawId is { } id)
            {
                ids.Add(id);
                continue;
            }
            var normalized = _normalization is { } normalize ? normalize(raw) : raw;
            var offset = 0;
            foreach (var (piece, pieceId) in _added.Split(normalized, normalized: true))
            {
                var atStart = rawAtStart && offset == 0;
                offset += piece.Length;
                if (pieceId is { } id2)
                {
                    ids.Add(id2);
                    continue;
                }
                foreach (var word in PreTokenizer.Run(_preTokenizer, piece, atStart))
                    _model.Tokenize(word, ids);
            }
        }
        if (addSpecialTokens && _postProcessor is not null) return _postProcessor.Apply(ids);
        return [.. ids];
    }

    /// <summary>Decodes ids; ids with no token are skipped, as tokenizers does.</summary>
    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        var tokens = new List<string>(ids.Length);
        foreach (var id in ids)
        {
            if (_added.ById(id) is { } token)
            {
                if (!(skipSpecialTokens && token.Special)) tokens.Add(token.Content);
            }
            else if (_model.IdToToken(id) is { } t)
            {
                // Like tokenizers, a model token whose text equals a special added token is skipped too.
                if (!(skipSpecialTokens && _added.IsSpecial(t))) tokens.Add(t);
            }
        }
        return _decoder is null ? string.Join(' ', tokens) : string.Concat(_decoder.DecodeChain(tokens));
    }

    /// <summary>The pieces the normalizer and pre-tokenizer make of <paramref name="text"/> (added tokens are not
    /// looked for), like tokenizers' <c>pre_tokenize_str</c>; byte-level pieces are in the byte alphabet ('Ġ' = space).</summary>
    public IReadOnlyList<string> PreTokenize(string text)
    {
        text = ReplaceLoneSurrogates(text);
        return PreTokenizer.Run(_preTokenizer, _normalization is { } normalize ? normalize(text) : text);
    }

    public int? TokenToId(string token) =>
        _added.ByContent(token) is { } added ? added.Id : _model.TryGetId(token, out var id) ? id : null;

    /// <summary>The token text of an id (vocab or added token), or null.</summary>
    public string? IdToToken(int id) => _added.ById(id)?.Content ?? _model.IdToToken(id);

    // Rust strings cannot hold lone surrogates; the UTF-8 the HF library would see has U+FFFD in their place.
    private static string ReplaceLoneSurrogates(string text)
    {
        if (text.AsSpan().IndexOfAnyInRange('\uD800', '\uDFFF') < 0) return text;
        return Encoding.UTF8.GetString(Encoding.UTF8.GetBytes(text));
    }
}

internal sealed record AddedToken(int Id, string Content, bool Special, bool SingleWord, bool LStrip, bool RStrip, bool Normalized);

/// <summary>tokenizers' AddedVocabulary: tokens found in the text before anything else, leftmost then longest.</summary>
internal sealed class AddedTokens
{
    private readonly Dictionary<int, AddedToken> _byId = new();
    private readonly Dictionary<string, AddedToken> _byContent = new(StringComparer.Ordinal);
    private readonly HashSet<string> _special = new(StringComparer.Ordinal);
    // Candidates by first character, longest first; one table per pass (raw text, normalized text).
    private readonly Dictionary<char, List<(string Text, AddedToken Token)>> _raw = new();
    private readonly Dictionary<char, List<(string Text, AddedToken Token)>> _normalized = new();

    public int MaxId => _byId.Count == 0 ? -1 : _byId.Keys.Max();

    public static AddedTokens FromJson(JsonElement el, Func<string, string>? normalization)
    {
        var result = new AddedTokens();
        if (el.ValueKind is JsonValueKind.Undefined or JsonValueKind.Null) return result;
        if (el.ValueKind != JsonValueKind.Array)
            throw new TokenizerException("tokenizer.json: \"added_tokens\" must be an array");
        foreach (var t in el.EnumerateArray())
        {
            if (!t.TryGetProperty("id", out var idEl) || !idEl.TryGetInt32(out var id) || Json.String(t, "content") is not { Length: > 0 } content)
                throw new TokenizerException("tokenizer.json: an added token has no id or content");
            var special = Json.Bool(t, "special", false);
            var token = new AddedToken(id, content, special, Json.Bool(t, "single_word", false), Json.Bool(t, "lstrip", false),
                Json.Bool(t, "rstrip", false), Json.Bool(t, "normalized", !special));
            result._byId[id] = token;
            result._byContent[content] = token;
            if (special) result._special.Add(content);
            // Normalized tokens are matched on normalized text, so their own text is normalized the same way.
            var (table, text) = token.Normalized
                ? (result._normalized, normalization is { } normalize ? normalize(content) : content)
                : (result._raw, content);
            if (text.Length == 0) continue;
            if (!table.TryGetValue(text[0], out var list)) table[text[0]] = list = [];
            list.Add((text, token));
        }
        foreach (var list in result._raw.Values.Concat(result._normalized.Values))
            list.Sort((a, b) => b.Text.Length.CompareTo(a.Text.Length));
        return result;
    }

    public AddedToken? ById(int id) => _byId.GetValueOrDefault(id);
    public AddedToken? ByContent(string content) => _byContent.GetValueOrDefault(content);
    public bool IsSpecial(string content) => _special.Contains(content);

    /// <summary>The text cut into plain pieces (id null) and added tokens, as AddedVocabulary::find_matches.</summary>
    public List<(string Text, int? Id)> Split(string sentence, bool normalized)
    {
        var table = normalized ? _normalized : _raw;
        if (table.Count == 0 || sentence.Length == 0) return [(sentence, null)];
        var result = new List<(string, int?)>();
        var startOffset = 0;
        var i = 0;
        while (i < sentence.Length)
        {
            var match = MatchAt(table, sentence, i);
            if (match is not { } m)
            {
                i++;
                continue;
            }
            var start = i;
            var stop = i + m.Text.Length;
            i = stop;
            var token = m.Token;
            if (token.SingleWord)
            {
                var startSpace = start == 0 || !EndsWithWordChar(sentence, start);
                var stopSpace = stop == sentence.Length || !StartsWithWordChar(sentence, stop);
                if (!startSpace || !stopSpace) continue;
            }
            if (token.LStrip)
            {
                var newStart = start;
                while (newStart > 0 && char.IsWhiteSpace(sentence[newStart - 1])) newStart--;
                start = Math.Max(newStart, startOffset);
            }
            if (token.RStrip)
                while (stop < sentence.Length && char.IsWhiteSpace(sentence[stop])) stop++;
            if (startOffset < start) result.Add((sentence[startOffset..start], null));
            result.Add((sentence[start..stop], token.Id));
            startOffset = stop;
            i = Math.Max(i, stop);
        }
        if (startOffset != sentence.Length) result.Add((sentence[startOffset..], null));
        return result;
    }

    private static (string Text, AddedToken Token)? MatchAt(Dictionary<char, List<(string Text, AddedToken Token)>> table,
        string s, int i)
    {
        if (!table.TryGetValue(s[i], out var candidates)) return null;
        foreach (var c in candidates)
            if (i + c.Text.Length <= s.Length && string.CompareOrdinal(s, i, c.Text, 0, c.Text.Length) == 0)
                return c;
        return null;
    }

    // Rust's char::is_alphanumeric() || '_' on the neighbouring character.
    private static bool EndsWithWordChar(string s, int end) => IsWordRune(Rune.GetRuneAt(s, PreviousRuneStart(s, end)));
    private static bool StartsWithWordChar(string s, int start) => IsWordRune(Rune.GetRuneAt(s, start));

    private static int PreviousRuneStart(string s, int end) =>
        end >= 2 && char.IsLowSurrogate(s[end - 1]) && char.IsHighSurrogate(s[end - 2]) ? end - 2 : end - 1;

    private static bool IsWordRune(Rune r) => r.Value == '_' || Rune.IsLetterOrDigit(r) || Rune.GetUnicodeCategory(r) is
        System.Globalization.UnicodeCategory.LetterNumber or System.Globalization.UnicodeCategory.OtherNumber;
}

/// <summary>Adds the special tokens of a single sequence, as the tokenizer.json post_processor does.</summary>
internal sealed class PostProcessor(IReadOnlyList<int[]?> template)
{
    /// <summary>null entries stand for the sequence itself.</summary>
    private readonly IReadOnlyList<int[]?> _template = template;

    public int[] Apply(List<int> ids)
    {
        var result = new List<int>(ids.Count + 4);
        foreach (var part in _template)
            if (part is null) result.AddRange(ids);
            else result.AddRange(part);
        return [.. result];
    }

    public static PostProcessor? FromJson(JsonElement el, BpeModel model)
    {
        if (el.ValueKind is JsonValueKind.Undefined or JsonValueKind.Null) return null;
        var type = Json.Type(el, "post_processor");
        switch (type)
        {
            case "ByteLevel":
                return null; // only trims offsets
            case "TemplateProcessing":
                return Template(el);
            case "RobertaProcessing" or "BertProcessing":
                return new PostProcessor([TokenPair(el, "cls"), null, TokenPair(el, "sep")]);
            case "Sequence":
            {
                if (!el.TryGetProperty("processors", out var list) || list.ValueKind != JsonValueKind.Array)
                    throw new TokenizerException("tokenizer.json: Sequence post_processor has no \"processors\" array");
                var adding = list.EnumerateArray().Select(p => FromJson(p, model)).Where(p => p is not null).ToList();
                if (adding.Count > 1)
                    throw new TokenizerException("tokenizer.json: several post-processors that add tokens are not supported");
                return adding.SingleOrDefault();
            }
            default:
                throw new TokenizerException($"tokenizer.json: the post_processor \"{type}\" is not supported " +
                                             "(supported: TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence)");
        }
    }

    private static int[] TokenPair(JsonElement el, string name)
    {
        if (el.TryGetProperty(name, out var pair) && pair.ValueKind == JsonValueKind.Array && pair.GetArrayLength() == 2
            && pair[1].TryGetInt32(out var id))
            return [id];
        throw new TokenizerException($"tokenizer.json: post_processor \"{name}\" must be [token, id]");
    }

    private static PostProcessor Template(JsonElement el)
    {
        if (!el.TryGetProperty("single", out var single) || single.ValueKind != JsonValueKind.Array)
            throw new TokenizerException("tokenizer.json: TemplateProcessing has no \"single\" template");
        var specials = el.TryGetProperty("special_tokens", out var st) && st.ValueKind == JsonValueKind.Object ? st : default;
        var parts = new List<int[]?>();
        foreach (var piece in single.EnumerateArray())
        {
            if (piece.TryGetProperty("Sequence", out _))
            {
                parts.Add(null);
            }
            else if (piece.TryGetProperty("SpecialToken", out var special) && Json.String(special, "id") is { } name)
            {
                if (specials.ValueKind != JsonValueKind.Object || !specials.TryGetProperty(name, out var entry)
                    || !entry.TryGetProperty("ids", out var idsEl) || idsEl.ValueKind != JsonValueKind.Array)
                    throw new TokenizerException($"tokenizer.json: TemplateProcessing uses \"{name}\" but special_tokens does not define its ids");
                parts.Add([.. idsEl.EnumerateArray().Select(x => x.GetInt32())]);
            }
            else throw new TokenizerException("tokenizer.json: a TemplateProcessing piece is neither Sequence nor SpecialToken");
        }
        return new PostProcessor(parts);
    }
}
