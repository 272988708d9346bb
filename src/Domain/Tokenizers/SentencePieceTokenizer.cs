using System.Text;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// A SentencePiece <c>tokenizer.model</c> (Llama 2, Mistral and the like, in folders without tokenizer.json), encoding
/// as the sentencepiece library does: the normalizer spec (add_dummy_prefix, remove_extra_whitespaces,
/// escape_whitespaces; the "identity" rule set only), then BPE merges by piece score (or unigram Viterbi), unused
/// pieces re-split, unknown pieces as UTF-8 byte pieces when byte_fallback is on (else runs of unknowns as one unk).
/// Control and unknown pieces written in the text (&lt;s&gt;, &lt;/s&gt;, &lt;unk&gt;) are taken as those tokens, as
/// transformers' Llama tokenizer does; the text between them is encoded by sentencepiece piece by piece.
/// </summary>
public sealed class SentencePieceTokenizer : ITokenizer
{
    private const char Space = '\u2581';
    private const float UnkPenalty = 10f;

    private readonly SentencePieceModel _model;
    private readonly Dictionary<string, int> _pieces = new(StringComparer.Ordinal);    // normal, user-defined, unused
    private readonly Dictionary<string, int> _reserved = new(StringComparer.Ordinal);  // control, unknown, byte
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _piecesBySpan;
    private readonly int _unkId;
    private readonly int[] _byteIds = new int[256];
    private readonly PrefixMatcher _userDefined;
    private readonly PrefixMatcher _specials;
    private readonly int _maxPieceLength;
    private readonly float _minScore = float.MaxValue, _maxScore = 1.17549435E-38f; // as sentencepiece: FLT_MAX, FLT_MIN
    private readonly bool _addBos, _addEos;

    public int VocabSize => _model.Pieces.Count;
    public int? BosId { get; }
    public int? EosId { get; }
    public int PadId { get; }
    public bool HasPadToken { get; }
    public ChatTemplate? ChatTemplate { get; internal set; }

    private SentencePieceTokenizer(SentencePieceModel model, string? bosToken, string? eosToken, string? padToken,
        bool? addBos, bool? addEos)
    {
        _model = model;
        if (model.ModelType is not (SentencePieceModelType.Bpe or SentencePieceModelType.Unigram))
            throw new TokenizerException($"tokenizer.model: the model type {model.ModelType.ToString().ToUpperInvariant()} is not supported (supported: BPE, UNIGRAM)");
        if (model.Pieces.Count == 0) throw new TokenizerException("tokenizer.model has no pieces");
        if (model.HasDenormalizer)
            throw new TokenizerException("tokenizer.model: a denormalizer_spec is not supported");
        var userDefined = new List<string>();
        var specials = new List<string>();
        Array.Fill(_byteIds, -1);
        var unk = -1;
        for (var i = 0; i < model.Pieces.Count; i++)
        {
            var (piece, score, type) = model.Pieces[i];
            if (piece.Length == 0) throw new TokenizerException($"tokenizer.model: piece {i} is empty");
            var normal = type is PieceType.Normal or PieceType.UserDefined or PieceType.Unused;
            if (!(normal ? _pieces : _reserved).TryAdd(piece, i))
                throw new TokenizerException($"tokenizer.model: the piece \"{piece}\" is defined twice");
            _maxPieceLength = Math.Max(_maxPieceLength, piece.Length);
            switch (type)
            {
                case PieceType.Normal:
                    _minScore = Math.Min(_minScore, score);
                    _maxScore = Math.Max(_maxScore, score);
                    break;
                case PieceType.UserDefined:
                    userDefined.Add(piece);
                    break;
                case PieceType.Unknown:
                    if (unk >= 0) throw new TokenizerException("tokenizer.model: more than one unknown piece");
                    unk = i;
                    specials.Add(piece);
                    break;
                case PieceType.Control:
                    specials.Add(piece);
                    break;
                case PieceType.Byte:
                    if (!model.ByteFallback)
                        throw new TokenizerException($"tokenizer.model: byte piece \"{piece}\" found although byte_fallback is false");
                    if (!ByteFallbackDecoder.TryByte(piece, out var b))
                        throw new TokenizerException($"tokenizer.model: byte piece \"{piece}\" is not of the form <0xNN>");
                    _byteIds[b] = i;
                    break;
            }
        }
        if (unk < 0) throw new TokenizerException("tokenizer.model: no unknown piece (<unk>) is defined");
        _unkId = unk;
        if (model.ByteFallback && _byteIds.Any(id => id < 0))
            throw new TokenizerException("tokenizer.model: byte_fallback is on but not all 256 byte pieces are defined");
        _piecesBySpan = _pieces.GetAlternateLookup<ReadOnlySpan<char>>();
        _userDefined = new PrefixMatcher(userDefined);
        _specials = new PrefixMatcher(specials);
        // nmt_nfkc and other rule sets are a compiled trie of replacements; the Llama-family models use "identity".
        if (model.PrecompiledCharsmap.Length > 0)
            throw new TokenizerException(
                $"tokenizer.model: the normalizer \"{model.NormalizerName}\" (a precompiled charsmap) is not supported (supported: identity)");

        BosId = Special(bosToken, model.BosPiece, "bos_token");
        EosId = Special(eosToken, model.EosPiece, "eos_token");
        var pad = Special(padToken, model.PadPiece, "pad_token");
        PadId = pad ?? EosId ?? BosId ?? 0;
        HasPadToken = pad is not null;
        // transformers' Llama tokenizer: add_bos_token defaults to true, add_eos_token to false.
        _addBos = addBos ?? true;
        _addEos = addEos ?? false;

        int? Special(string? configured, string piece, string what)
        {
            if (configured is not null)
                return TokenToId(configured) ?? throw new TokenizerException($"the {what} \"{configured}\" is not in tokenizer.model");
            return _reserved.TryGetValue(piece, out var id) && model.Pieces[id].Type == PieceType.Control ? id : null;
        }
    }

    public static SentencePieceTokenizer FromFile(string path, string? bosToken = null, string? eosToken = null,
        string? padToken = null, bool? addBosToken = null, bool? addEosToken = null)
    {
        byte[] data;
        try
        {
            var length = new FileInfo(path).Length;
            if (length > SentencePieceModel.MaxFileBytes)
                throw new TokenizerException($"tokenizer.model is {length} bytes, more than the {SentencePieceModel.MaxFileBytes} allowed");
            data = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new TokenizerException($"cannot read {path}: {e.Message}", e);
        }
        return FromBytes(data, bosToken, eosToken, padToken, addBosToken, addEosToken);
    }

    public static SentencePieceTokenizer FromBytes(byte[] data, string? bosToken = null, string? eosToken = null,
        string? padToken = null, bool? addBosToken = null, bool? addEosToken = null) =>
        new(SentencePieceModel.Parse(data), bosToken, eosToken, padToken, addBosToken, addEosToken);

    public int[] Encode(string text, bool addSpecialTokens = false)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>();
        if (addSpecialTokens && _addBos && BosId is { } bos) ids.Add(bos);
        var start = 0;
        for (var i = 0; i < text.Length;)
        {
            if (_specials.Match(text, i) is { } special)
            {
                if (i > start) EncodePlain(text[start..i], ids);
                ids.Add(_reserved[special]);
                i += special.Length;
                start = i;
            }
            else i++;
        }
        if (start < text.Length) EncodePlain(text[start..], ids);
        if (addSpecialTokens && _addEos && EosId is { } eos) ids.Add(eos);
        return [.. ids];
    }

    /// <summary>sentencepiece's Encode of one piece of text: normalize, segment, then byte fallback / unk merging.</summary>
    private void EncodePlain(string text, List<int> ids)
    {
        var normalized = Normalize(text);
        if (normalized.Length == 0) return;
        var segments = _model.ModelType == SentencePieceModelType.Bpe ? EncodeBpe(normalized) : EncodeUnigram(normalized);
        var previousUnknown = false;
        foreach (var (piece, id) in segments)
        {
            var unknown = id == _unkId;
            if (unknown && _model.ByteFallback)
                foreach (var b in Encoding.UTF8.GetBytes(piece)) ids.Add(_byteIds[b]);
            else if (!(unknown && previousUnknown))
                ids.Add(id); // a run of unknown pieces is one unknown token
            previousUnknown = unknown;
        }
    }

    /// <summary>sentencepiece's Normalizer::Normalize, on UTF-8 bytes.</summary>
    private string Normalize(string text)
    {
        // Rust-like: lone surrogates cannot be UTF-8; the library would see U+FFFD.
        var input = Encoding.UTF8.GetBytes(text);
        var output = new List<byte>(input.Length + 8);
        var spaceSymbol = _model.EscapeWhitespaces ? "\u2581"u8.ToArray() : " "u8.ToArray();
        var pos = 0;
        if (_model.RemoveExtraWhitespaces)
            while (pos < input.Length)
            {
                var (piece, consumed) = NormalizePrefix(input, pos);
                if (!(piece.Length == 1 && piece[0] == (byte)' ')) break;
                pos += consumed;
            }
        if (pos == input.Length) return "";
        if (!_model.TreatWhitespaceAsSuffix && _model.AddDummyPrefix) output.AddRange(spaceSymbol);
        var previousSpace = _model.RemoveExtraWhitespaces;
        while (pos < input.Length)
        {
            var (piece, consumed) = NormalizePrefix(input, pos);
            var sp = piece.AsSpan();
            while (previousSpace && sp.Length > 0 && sp[0] == (byte)' ') sp = sp[1..];
            if (sp.Length > 0)
            {
                foreach (var b in sp)
                    if (_model.EscapeWhitespaces && b == (byte)' ') output.AddRange(spaceSymbol);
                    else output.Add(b);
                previousSpace = sp[^1] == (byte)' ';
            }
            pos += consumed;
            if (!_model.RemoveExtraWhitespaces) previousSpace = false;
        }
        if (_model.RemoveExtraWhitespaces)
            while (output.Count >= spaceSymbol.Length
                   && System.Runtime.InteropServices.CollectionsMarshal.AsSpan(output)[^spaceSymbol.Length..].SequenceEqual(spaceSymbol))
                output.RemoveRange(output.Count - spaceSymbol.Length, spaceSymbol.Length);
        if (_model.TreatWhitespaceAsSuffix && _model.AddDummyPrefix) output.AddRange(spaceSymbol);
        return Encoding.UTF8.GetString(output.ToArray());
    }

    /// <summary>The normalized form of the longest prefix at <paramref name="pos"/>: a user-defined symbol as is, else
    /// one UTF-8 character (a malformed byte becomes U+FFFD); the identity normalizer changes nothing else.</summary>
    private (byte[] Piece, int Consumed) NormalizePrefix(byte[] input, int pos)
    {
        if (_userDefined.MatchUtf8(input, pos) is { } user) return (input[pos..(pos + user)], user);
        var length = Utf8Length(input, pos);
        return length > 0 ? (input[pos..(pos + length)], length) : ("\uFFFD"u8.ToArray(), 1);
    }

    private static int Utf8Length(byte[] s, int pos) =>
        Rune.DecodeFromUtf8(s.AsSpan(pos), out _, out var n) == System.Buffers.OperationStatus.Done ? n : 0;

    private int PieceToId(ReadOnlySpan<char> piece)
    {
        var reserved = _reserved.GetAlternateLookup<ReadOnlySpan<char>>();
        if (reserved.TryGetValue(piece, out var id)) return id;
        return _piecesBySpan.TryGetValue(piece, out id) ? id : _unkId;
    }

    private struct Symbol
    {
        public int Start, Length, Prev, Next;
        public bool Freeze;
    }

    private readonly record struct Pair(int Left, int Right, int Length);

    private sealed class PairOrder : IComparer<(float Score, int Left)>
    {
        public static readonly PairOrder Instance = new();
        // Highest score first, then the leftmost pair.
        public int Compare((float Score, int Left) a, (float Score, int Left) b) =>
            a.Score != b.Score ? b.Score.CompareTo(a.Score) : a.Left.CompareTo(b.Left);
    }

    /// <summary>sentencepiece's bpe::Model::Encode: merge the adjacent pair whose union is the highest-scored piece.</summary>
    private List<(string Piece, int Id)> EncodeBpe(string s)
    {
        var symbols = new List<Symbol>(s.Length);
        for (var i = 0; i < s.Length;)
        {
            var user = _userDefined.Match(s, i);
            var length = user?.Length ?? (char.IsHighSurrogate(s[i]) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]) ? 2 : 1);
            symbols.Add(new Symbol { Start = i, Length = length, Prev = symbols.Count - 1, Next = i + length < s.Length ? symbols.Count + 1 : -1, Freeze = user is not null });
            i += length;
        }
        var agenda = new PriorityQueue<Pair, (float, int)>(PairOrder.Instance);
        var reverseMerge = new Dictionary<string, (string, string)>(StringComparer.Ordinal);
        var sym = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(symbols);

        void MaybeAdd(Span<Symbol> sy, int left, int right)
        {
            if (left == -1 || right == -1 || sy[left].Freeze || sy[right].Freeze) return;
            var length = sy[left].Length + sy[right].Length;
            var piece = s.AsSpan(sy[left].Start, length);
            if (!_piecesBySpan.TryGetValue(piece, out var id)) return;
            agenda.Enqueue(new Pair(left, right, length), (_model.Pieces[id].Score, left));
            if (_model.Pieces[id].Type == PieceType.Unused)
                reverseMerge[piece.ToString()] = (s.Substring(sy[left].Start, sy[left].Length), s.Substring(sy[right].Start, sy[right].Length));
        }

        for (var i = 1; i < sym.Length; i++) MaybeAdd(sym, i - 1, i);
        while (agenda.TryDequeue(out var top, out _))
        {
            ref var left = ref sym[top.Left];
            ref var right = ref sym[top.Right];
            if (left.Length == 0 || right.Length == 0 || left.Length + right.Length != top.Length) continue;
            left.Length += right.Length;
            left.Next = right.Next;
            if (right.Next >= 0) sym[right.Next].Prev = top.Left;
            right.Length = 0;
            MaybeAdd(sym, left.Prev, top.Left);
            MaybeAdd(sym, top.Left, left.Next);
        }

        var output = new List<(string, int)>();
        for (var index = 0; index != -1; index = sym[index].Next)
            Resegment(s.Substring(sym[index].Start, sym[index].Length));
        return output;

        void Resegment(string w)
        {
            var id = PieceToId(w);
            if (_model.Pieces[id].Type == PieceType.Unused && reverseMerge.TryGetValue(w, out var parts))
            {
                Resegment(parts.Item1);
                Resegment(parts.Item2);
            }
            else output.Add((w, id));
        }
    }

    /// <summary>sentencepiece's unigram::Model::Encode: the best-scoring segmentation (Viterbi); a character no piece
    /// covers is unknown, scored min_score − 10; user-defined pieces score length·max_score − 0.1.</summary>
    private List<(string Piece, int Id)> EncodeUnigram(string s)
    {
        var bestScore = new double[s.Length + 1];
        var bestStart = new int[s.Length + 1];
        var bestId = new int[s.Length + 1];
        Array.Fill(bestStart, -1);
        var unkScore = _minScore - UnkPenalty;
        for (var start = 0; start < s.Length;)
        {
            var charLength = char.IsHighSurrogate(s[start]) && start + 1 < s.Length && char.IsLowSurrogate(s[start + 1]) ? 2 : 1;
            var here = (float)bestScore[start];
            var hasSingle = false;
            for (var end = start + 1; end <= Math.Min(s.Length, start + _maxPieceLength); end++)
            {
                if (end < s.Length && char.IsLowSurrogate(s[end])) continue;
                if (!_piecesBySpan.TryGetValue(s.AsSpan(start, end - start), out var id)) continue;
                var p = _model.Pieces[id];
                if (p.Type == PieceType.Unused) continue;
                double candidate = p.Type == PieceType.UserDefined
                    ? Encoding.UTF8.GetByteCount(s.AsSpan(start, end - start)) * _maxScore - 0.1 + here
                    : p.Score + here;
                if (bestStart[end] == -1 || candidate > (float)bestScore[end])
                    (bestScore[end], bestStart[end], bestId[end]) = ((float)candidate, start, id);
                if (end - start == charLength) hasSingle = true;
            }
            if (!hasSingle)
            {
                var end = start + charLength;
                var candidate = unkScore + here;
                if (bestStart[end] == -1 || candidate > (float)bestScore[end])
                    (bestScore[end], bestStart[end], bestId[end]) = (candidate, start, _unkId);
            }
            start += charLength;
        }
        var result = new List<(string, int)>();
        for (var end = s.Length; end > 0; end = bestStart[end]) result.Add((s[bestStart[end]..end], bestId[end]));
        result.Reverse();
        return result;
    }

    /// <summary>sentencepiece's Decode of one run of ids (control pieces are invisible there).</summary>
    private string DecodeRun(List<int> ids)
    {
        var text = new StringBuilder();
        var bytes = new List<byte>();
        var bosWhitespace = true;
        var bosWhitespaceSeen = false;
        foreach (var id in ids)
        {
            var (piece, _, type) = _model.Pieces[id];
            if (type == PieceType.Byte)
            {
                ByteFallbackDecoder.TryByte(piece, out var b);
                bytes.Add(b);
                continue;
            }
            FlushBytes();
            if (bosWhitespaceSeen || text.Length > 0) bosWhitespace = false;
            (var surface, bosWhitespaceSeen) = DecodePiece(piece, type, bosWhitespace);
            text.Append(surface);
        }
        FlushBytes();
        return text.ToString();

        void FlushBytes()
        {
            // Each valid UTF-8 character is its text; each malformed byte one U+FFFD.
            var span = bytes.ToArray().AsSpan();
            while (span.Length > 0)
            {
                if (Rune.DecodeFromUtf8(span, out var rune, out var consumed) == System.Buffers.OperationStatus.Done)
                    text.Append(rune.ToString());
                else
                {
                    text.Append('\uFFFD');
                    consumed = 1;
                }
                span = span[consumed..];
            }
            bytes.Clear();
        }
    }

    private (string Surface, bool BosWhitespace) DecodePiece(string piece, PieceType type, bool bosWhitespace)
    {
        if (type == PieceType.Control) return ("", false);
        if (type == PieceType.Unknown) return (_model.UnkSurface, false);
        var hasBosWhitespace = false;
        if (bosWhitespace && (_model.AddDummyPrefix || _model.RemoveExtraWhitespaces) && piece.StartsWith(Space))
        {
            piece = piece[1..];
            hasBosWhitespace = !_model.RemoveExtraWhitespaces;
        }
        return (piece.Replace(Space, ' '), hasBosWhitespace);
    }

    /// <summary>skipSpecialTokens: sentencepiece's decode of all ids (control pieces vanish). Otherwise control and
    /// unknown pieces are written as their text and each run between them is decoded on its own.</summary>
    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        var run = new List<int>();
        var text = new StringBuilder();
        foreach (var id in ids)
        {
            if (id < 0 || id >= _model.Pieces.Count) continue;
            var type = _model.Pieces[id].Type;
            if (type is PieceType.Control or PieceType.Unknown)
            {
                if (skipSpecialTokens && type == PieceType.Control) continue;
                if (!skipSpecialTokens)
                {
                    text.Append(DecodeRun(run)).Append(_model.Pieces[id].Piece);
                    run.Clear();
                    continue;
                }
            }
            run.Add(id);
        }
        return text.Append(DecodeRun(run)).ToString();
    }

    public int? TokenToId(string token) =>
        _reserved.TryGetValue(token, out var id) || _pieces.TryGetValue(token, out id) ? id : null;

    public string? IdToToken(int id) => id >= 0 && id < _model.Pieces.Count ? _model.Pieces[id].Piece : null;

    /// <summary>Longest match among a set of strings at a position.</summary>
    private sealed class PrefixMatcher
    {
        private readonly Dictionary<char, string[]> _byFirst;
        private readonly Dictionary<byte, byte[][]> _byFirstByte;

        public PrefixMatcher(IEnumerable<string> items)
        {
            var list = items.Distinct().ToList();
            _byFirst = list.GroupBy(x => x[0]).ToDictionary(g => g.Key, g => g.OrderByDescending(x => x.Length).ToArray());
            _byFirstByte = list.Select(x => Encoding.UTF8.GetBytes(x)).GroupBy(x => x[0])
                .ToDictionary(g => g.Key, g => g.OrderByDescending(x => x.Length).ToArray());
        }

        public string? Match(string s, int i)
        {
            if (!_byFirst.TryGetValue(s[i], out var candidates)) return null;
            foreach (var c in candidates)
                if (i + c.Length <= s.Length && string.CompareOrdinal(s, i, c, 0, c.Length) == 0) return c;
            return null;
        }

        public int? MatchUtf8(byte[] s, int i)
        {
            if (!_byFirstByte.TryGetValue(s[i], out var candidates)) return null;
            foreach (var c in candidates)
                if (s.AsSpan(i).StartsWith(c)) return c.Length;
            return null;
        }
    }
}
