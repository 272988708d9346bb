using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// The "BPE" model of a Hugging Face tokenizer.json, following tokenizers' <c>BPE::merge_word</c> and
/// <c>Word::merge_all</c>: symbols start as single characters, and the pair of lowest merge rank (leftmost on ties)
/// is merged until no ranked pair is left.
/// </summary>
internal sealed class BpeModel
{
    private const int CacheCapacity = 10_000;
    private const int MaxCachedWordLength = 256;

    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<int, string> _idToToken;
    private readonly Dictionary<long, (int Rank, int NewId)> _merges;
    private readonly string? _unkToken;
    private readonly bool _fuseUnk;
    private readonly bool _byteFallback;
    private readonly bool _ignoreMerges;
    private readonly string? _prefix;
    private readonly string? _suffix;
    private readonly ConcurrentDictionary<string, int[]> _cache = new();

    public BpeModel(Dictionary<string, int> vocab, IReadOnlyList<(string A, string B)> merges, string? unkToken = null,
        bool fuseUnk = false, bool byteFallback = false, bool ignoreMerges = false,
        string? continuingSubwordPrefix = null, string? endOfWordSuffix = null)
    {
        _vocab = vocab;
        _idToToken = new Dictionary<int, string>(vocab.Count);
        foreach (var (token, id) in vocab) _idToToken[id] = token;
        _unkToken = unkToken;
        _fuseUnk = fuseUnk;
        _byteFallback = byteFallback;
        _ignoreMerges = ignoreMerges;
        _prefix = continuingSubwordPrefix;
        _suffix = endOfWordSuffix;
        if (unkToken is not null && !vocab.ContainsKey(unkToken))
            throw new TokenizerException($"tokenizer.json: the BPE unk_token \"{unkToken}\" is not in the vocab");

        var prefixLength = continuingSubwordPrefix?.Length ?? 0;
        _merges = new Dictionary<long, (int, int)>(merges.Count);
        for (var rank = 0; rank < merges.Count; rank++)
        {
            var (a, b) = merges[rank];
            if (!vocab.TryGetValue(a, out var aId) || !vocab.TryGetValue(b, out var bId))
                throw new TokenizerException($"tokenizer.json: merge {rank} (\"{a}\" \"{b}\") uses a token that is not in the vocab");
            var merged = a + (prefixLength <= b.Length ? b[prefixLength..] : "");
            if (!vocab.TryGetValue(merged, out var newId))
                throw new TokenizerException($"tokenizer.json: the result of merge {rank} (\"{merged}\") is not in the vocab");
            // The first occurrence of a pair keeps its rank, as a later duplicate would never be reached.
            _merges.TryAdd(Key(aId, bId), (rank, newId));
        }
    }

    public int MaxId => _idToToken.Count == 0 ? -1 : _idToToken.Keys.Max();

    public bool TryGetId(string token, out int id) => _vocab.TryGetValue(token, out id);

    public string? IdToToken(int id) => _idToToken.GetValueOrDefault(id);

    public static BpeModel FromJson(JsonElement model)
    {
        if (!model.TryGetProperty("vocab", out var vocabEl) || vocabEl.ValueKind != JsonValueKind.Object)
            throw new TokenizerException("tokenizer.json: the BPE model has no \"vocab\" object");
        var vocab = new Dictionary<string, int>();
        foreach (var p in vocabEl.EnumerateObject())
        {
            if (p.Value.ValueKind != JsonValueKind.Number || !p.Value.TryGetInt32(out var id) || id < 0)
                throw new TokenizerException($"tokenizer.json: vocab entry \"{p.Name}\" has no valid id");
            vocab[p.Name] = id;
        }

        var merges = new List<(string, string)>();
        if (model.TryGetProperty("merges", out var mergesEl) && mergesEl.ValueKind != JsonValueKind.Null)
        {
            if (mergesEl.ValueKind != JsonValueKind.Array)
                throw new TokenizerException("tokenizer.json: BPE \"merges\" must be an array");
            var i = 0;
            foreach (var m in mergesEl.EnumerateArray())
            {
                // Older files write "a b"; newer ones ["a", "b"] (which allows spaces inside tokens).
                if (m.ValueKind == JsonValueKind.String)
                {
                    var parts = m.GetString()!.Split(' ');
                    if (parts.Length != 2)
                        throw new TokenizerException($"tokenizer.json: merge {i} \"{m.GetString()}\" is not two tokens separated by a space");
                    merges.Add((parts[0], parts[1]));
                }
                else if (m.ValueKind == JsonValueKind.Array && m.GetArrayLength() == 2
                         && m[0].ValueKind == JsonValueKind.String && m[1].ValueKind == JsonValueKind.String)
                    merges.Add((m[0].GetString()!, m[1].GetString()!));
                else
                    throw new TokenizerException($"tokenizer.json: merge {i} is neither \"a b\" nor [\"a\", \"b\"]");
                i++;
            }
        }

        if (model.TryGetProperty("dropout", out var dropout) && dropout.ValueKind == JsonValueKind.Number && dropout.GetDouble() > 0)
            throw new TokenizerException("tokenizer.json: BPE dropout is not supported (it makes encoding random)");

        return new BpeModel(vocab, merges,
            unkToken: OptionalString(model, "unk_token"),
            fuseUnk: OptionalBool(model, "fuse_unk"),
            byteFallback: OptionalBool(model, "byte_fallback"),
            ignoreMerges: OptionalBool(model, "ignore_merges"),
            continuingSubwordPrefix: OptionalString(model, "continuing_subword_prefix"),
            endOfWordSuffix: OptionalString(model, "end_of_word_suffix"));
    }

    /// <summary>Appends the ids of one pre-token.</summary>
    public void Tokenize(string word, List<int> output)
    {
        if (word.Length == 0) return;
        if (_ignoreMerges && _vocab.TryGetValue(word, out var whole))
        {
            output.Add(whole);
            return;
        }
        // SentencePiece-style tokenizers without a pre-tokenizer hand whole texts here: those are not worth caching.
        if (word.Length > MaxCachedWordLength)
        {
            output.AddRange(MergeWord(word));
            return;
        }
        if (!_cache.TryGetValue(word, out var ids))
        {
            ids = MergeWord(word);
            // A crude bound: long texts have many distinct pieces, and a full cache is simply started again.
            if (_cache.Count >= CacheCapacity) _cache.Clear();
            _cache.TryAdd(word, ids);
        }
        output.AddRange(ids);
    }

    private int[] MergeWord(string w)
    {
        var symbols = new List<int>(w.Length);
        int? unkId = null;
        var runes = w.EnumerateRunes().ToArray();
        for (var i = 0; i < runes.Length; i++)
        {
            var s = runes[i].ToString();
            if (i > 0 && _prefix is not null) s = _prefix + s;
            if (i == runes.Length - 1 && _suffix is not null) s += _suffix;
            if (_vocab.TryGetValue(s, out var id))
            {
                if (unkId is { } u) { symbols.Add(u); unkId = null; }
                symbols.Add(id);
                continue;
            }
            if (_byteFallback && TryByteTokens(s, out var byteIds))
            {
                // As in tokenizers, a pending unknown is not flushed before byte tokens.
                symbols.AddRange(byteIds);
                continue;
            }
            if (_unkToken is not null)
            {
                var unk = _vocab[_unkToken];
                if (unkId is { } pending && !_fuseUnk) symbols.Add(pending);
                unkId = unk;
            }
            // Without unk_token or byte fallback, a character outside the vocab is dropped, as tokenizers does.
        }
        if (unkId is { } last) symbols.Add(last);
        return MergeAll(symbols);
    }

    private bool TryByteTokens(string s, out List<int> ids)
    {
        ids = [];
        foreach (var b in Encoding.UTF8.GetBytes(s))
        {
            if (!_vocab.TryGetValue($"<0x{b:X2}>", out var id)) return false;
            ids.Add(id);
        }
        return true;
    }

    private int[] MergeAll(List<int> c)
    {
        var n = c.Count;
        if (n < 2) return [.. c];
        var prev = new int[n];
        var next = new int[n];
        var removed = new bool[n];
        for (var i = 0; i < n; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < n ? i + 1 : -1;
        }
        // Min-heap on (rank, position), like tokenizers' BinaryHeap of Merge.
        var queue = new PriorityQueue<(int Pos, int NewId), (int Rank, int Pos)>();
        for (var i = 0; i + 1 < n; i++)
            if (_merges.TryGetValue(Key(c[i], c[i + 1]), out var m))
                queue.Enqueue((i, m.NewId), (m.Rank, i));

        while (queue.TryDequeue(out var top, out _))
        {
            var pos = top.Pos;
            if (removed[pos] || next[pos] == -1) continue;
            var right = next[pos];
            // Skip stale entries: the pair at pos must still merge into the same token.
            if (!_merges.TryGetValue(Key(c[pos], c[right]), out var current) || current.NewId != top.NewId) continue;
            c[pos] = top.NewId;
            removed[right] = true;
            next[pos] = next[right];
            if (next[right] != -1) prev[next[right]] = pos;
            if (prev[pos] >= 0 && _merges.TryGetValue(Key(c[prev[pos]], c[pos]), out var left))
                queue.Enqueue((prev[pos], left.NewId), (left.Rank, prev[pos]));
            if (next[pos] != -1 && _merges.TryGetValue(Key(c[pos], c[next[pos]]), out var after))
                queue.Enqueue((pos, after.NewId), (after.Rank, pos));
        }

        var result = new List<int>(n);
        for (var i = 0; i < n; i++)
            if (!removed[i]) result.Add(c[i]);
        return [.. result];
    }

    private static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    private static string? OptionalString(JsonElement o, string name) =>
        o.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static bool OptionalBool(JsonElement o, string name) =>
        o.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.True;
}
