using FineTune.Domain.Datasets;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Training.Data;

/// <summary>Where the data stream stands: the next example is <c>Order(Epoch)[Index]</c>. Stored in checkpoints.</summary>
public readonly record struct DataPosition(int Epoch, int Index);

/// <summary>A micro-batch on the host: ids and labels (B, T), right-padded with the pad id and label -100.</summary>
public sealed record HostBatch(long[] Ids, long[] Labels, int Rows, int Length, long Tokens, long LossTokens)
{
    /// <summary>Packed rows only: position ids (B, T) restarting at each example, and segment ids (B, T), one per
    /// example of a row and -1 for padding (the model's attention mask keeps segments apart). Null when unpacked.</summary>
    public long[]? Positions { get; init; }
    public long[]? Segments { get; init; }
}

/// <summary>
/// The encoded training set as an endless stream of micro-batches over seeded per-epoch shuffles. Batches run on across
/// epoch ends, so the stream is a pure function of (seed, position): a resumed run sees exactly the same batches.
/// </summary>
public sealed class TrainingData
{
    private readonly IReadOnlyList<EncodedExample> _examples;
    private readonly IReadOnlyList<int[]>? _segments;
    private readonly long _seed;
    private readonly Dictionary<int, int[]> _orders = [];
    public int BatchSize { get; }
    public int PadId { get; }
    /// <summary>Examples dropped because truncation left them nothing to learn.</summary>
    public int Skipped { get; }

    /// <param name="segments">For packed rows: the lengths of the examples each row holds (see <see cref="Pack"/>).</param>
    public TrainingData(IReadOnlyList<EncodedExample> examples, int batchSize, int padId, long seed, int skipped = 0,
        IReadOnlyList<int[]>? segments = null)
    {
        if (examples.Count == 0) throw new ArgumentException("the dataset has no usable examples");
        if (segments is not null && segments.Count != examples.Count) throw new ArgumentException("one segment list per packed row");
        (_examples, BatchSize, PadId, _seed, Skipped, _segments) = (examples, batchSize, padId, seed, skipped, segments);
    }

    /// <summary>Whether the rows are packed examples.</summary>
    public bool Packed => _segments is not null;

    /// <summary>The training stream over encoded examples, packed into rows of at most <paramref name="maxSeqLength"/>
    /// tokens when <paramref name="packing"/> is set.</summary>
    public static TrainingData FromEncoded(IReadOnlyList<EncodedExample> encoded, int skipped, int batchSize, int padId, long seed,
        bool packing, int maxSeqLength)
    {
        if (encoded.Count == 0)
            throw new DatasetEncodingException(0, $"no example has a token to learn within maxSeqLength={maxSeqLength}");
        if (!packing) return new TrainingData(encoded, batchSize, padId, seed, skipped);
        var (rows, segments) = Pack(encoded, maxSeqLength, seed);
        return new TrainingData(rows, batchSize, padId, seed, skipped, segments);
    }

    public static TrainingData Build(IReadOnlyList<DatasetExample> examples, ITokenizer tokenizer, int maxSeqLength, int batchSize, long seed)
    {
        var encoded = Encode(examples, tokenizer, maxSeqLength, out var skipped);
        if (encoded.Count == 0)
            throw new DatasetEncodingException(examples.Count > 0 ? examples[0].Line : 0,
                $"no example has a token to learn within maxSeqLength={maxSeqLength}");
        return new TrainingData(encoded, batchSize, tokenizer.PadId, seed, skipped);
    }

    /// <summary>Encodes all examples; those whose loss tokens were all cut off by truncation are left out (counted).</summary>
    public static List<EncodedExample> Encode(IReadOnlyList<DatasetExample> examples, ITokenizer tokenizer, int maxSeqLength, out int skipped) =>
        Encode(examples, tokenizer, maxSeqLength, Truncation.Truncate, out skipped, out _);

    /// <summary>Encodes all examples under a truncation policy ("reject" throws for the first example that is too
    /// long, with its line); examples left with no loss token are left out and counted in <paramref name="skipped"/>.</summary>
    public static List<EncodedExample> Encode(IReadOnlyList<DatasetExample> examples, ITokenizer tokenizer, int maxSeqLength,
        string truncation, out int skipped, out int truncated)
    {
        var encoded = new List<EncodedExample>(examples.Count);
        (skipped, truncated) = (0, 0);
        foreach (var e in examples)
        {
            var (x, cut) = Truncation.Fit(e, tokenizer, maxSeqLength, truncation);
            if (cut) truncated++;
            if (x.LossTokens > 0) encoded.Add(x);
            else skipped++;
        }
        return encoded;
    }

    /// <summary>
    /// Holds out round(n·<paramref name="fraction"/>) examples (at least one, and at least one left to train on) for
    /// validation, chosen by a seeded permutation of their own, independent of the epoch shuffles. Both parts keep
    /// the file's order. Deterministic: the same seed and examples give the same split.
    /// </summary>
    public static (List<EncodedExample> Train, List<EncodedExample> Validation) Split(IReadOnlyList<EncodedExample> examples,
        double fraction, long seed)
    {
        if (!(fraction > 0 && fraction < 1)) throw new ArgumentOutOfRangeException(nameof(fraction), "must be in (0, 1)");
        if (examples.Count < 2)
            throw new DatasetEncodingException(examples.Count > 0 ? examples[0].Line : 0, "validationSplit needs at least 2 usable examples");
        var held = Math.Clamp((int)Math.Round(examples.Count * fraction), 1, examples.Count - 1);
        var order = Permutation(examples.Count, (ulong)seed * 0xD6E8FEB86659FD93UL ^ 0x5EED5EED5EED5EEDUL);
        var isValidation = new bool[examples.Count];
        for (var i = 0; i < held; i++) isValidation[order[i]] = true;
        var train = new List<EncodedExample>(examples.Count - held);
        var validation = new List<EncodedExample>(held);
        for (var i = 0; i < examples.Count; i++) (isValidation[i] ? validation : train).Add(examples[i]);
        return (train, validation);
    }

    /// <summary>
    /// Packs examples into rows of at most <paramref name="maxSeqLength"/> tokens: first-fit decreasing (longest
    /// first, ties in a seeded order; a max-segment tree finds the first row with room in O(log n)). Each row's ids
    /// and labels are its examples' concatenated, with the first label of every example set to -100, so no example
    /// is asked to predict its first token from the one before it; the loss tokens are exactly the examples' own.
    /// Returns the rows and, per row, the lengths of the examples in it.
    /// </summary>
    public static (List<EncodedExample> Rows, List<int[]> Segments) Pack(IReadOnlyList<EncodedExample> examples, int maxSeqLength, long seed)
    {
        var n = examples.Count;
        var order = Permutation(n, (ulong)seed * 0x9E3779B97F4A7C15UL ^ 0xFACCEDUL)
            .OrderByDescending(i => examples[i].Ids.Length).ToArray(); // stable: ties keep the seeded order
        var size = 1;
        while (size < Math.Max(1, n)) size <<= 1;
        var room = new int[2 * size];                                  // max free tokens in each subtree of rows
        Array.Fill(room, maxSeqLength);
        var members = new List<List<int>>();
        foreach (var i in order)
        {
            var len = examples[i].Ids.Length;
            if (len > maxSeqLength) throw new ArgumentException($"example of line {examples[i].Line} is longer than maxSeqLength");
            var node = 1;
            while (node < size) node = room[2 * node] >= len ? 2 * node : 2 * node + 1;
            var row = node - size;
            while (members.Count <= row) members.Add([]);
            members[row].Add(i);
            room[node] -= len;
            for (node /= 2; node >= 1; node /= 2) room[node] = Math.Max(room[2 * node], room[2 * node + 1]);
        }
        var rows = new List<EncodedExample>(members.Count);
        var segments = new List<int[]>(members.Count);
        foreach (var m in members)
        {
            var ids = m.SelectMany(i => examples[i].Ids).ToArray();
            var labels = new int[ids.Length];
            var offset = 0;
            foreach (var i in m)
            {
                examples[i].Labels.CopyTo(labels, offset);
                labels[offset] = EncodedExample.Ignore;
                offset += examples[i].Ids.Length;
            }
            rows.Add(new EncodedExample(examples[m[0]].Line, ids, labels));
            segments.Add([.. m.Select(i => examples[i].Ids.Length)]);
        }
        return (rows, segments);
    }

    private static int[] Permutation(int n, ulong state)
    {
        var order = Enumerable.Range(0, n).ToArray();
        for (var i = order.Length - 1; i > 0; i--)
        {
            var j = (int)(SplitMix64(ref state) % (ulong)(i + 1));
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order;
    }

    public int Count => _examples.Count;
    public IReadOnlyList<EncodedExample> Examples => _examples;
    public long TotalTokens => _examples.Sum(e => (long)e.Ids.Length);

    /// <summary>The shuffled order of one epoch (SplitMix64-driven Fisher–Yates: stable across .NET versions).</summary>
    public int[] Order(int epoch)
    {
        if (_orders.TryGetValue(epoch, out var order)) return order;
        order = Enumerable.Range(0, _examples.Count).ToArray();
        var state = (ulong)_seed * 0x9E3779B97F4A7C15UL + (ulong)epoch + 1;
        for (var i = order.Length - 1; i > 0; i--)
        {
            var j = (int)(SplitMix64(ref state) % (ulong)(i + 1));
            (order[i], order[j]) = (order[j], order[i]);
        }
        if (_orders.Count > 4) _orders.Clear();
        return _orders[epoch] = order;
    }

    /// <summary>The next <see cref="BatchSize"/> examples from <paramref name="position"/>, which is advanced.</summary>
    public IReadOnlyList<EncodedExample> Next(ref DataPosition position) => [.. NextIndices(ref position).Select(i => _examples[i])];

    private List<int> NextIndices(ref DataPosition position)
    {
        var batch = new List<int>(BatchSize);
        while (batch.Count < BatchSize)
        {
            var order = Order(position.Epoch);
            batch.Add(order[position.Index]);
            position = position.Index + 1 < order.Length ? position with { Index = position.Index + 1 } : new DataPosition(position.Epoch + 1, 0);
        }
        return batch;
    }

    public HostBatch NextBatch(ref DataPosition position)
    {
        var indices = NextIndices(ref position);
        var rows = indices.Select(i => _examples[i]).ToList();
        return _segments is null ? Collate(rows, PadId) : CollatePacked(rows, [.. indices.Select(i => _segments[i])], PadId);
    }

    /// <summary>Packed rows: <see cref="Collate"/> plus the position and segment ids of every token.</summary>
    public static HostBatch CollatePacked(IReadOnlyList<EncodedExample> rows, IReadOnlyList<int[]> segments, int padId)
    {
        var batch = Collate(rows, padId);
        var t = batch.Length;
        var positions = new long[rows.Count * t];
        var ids = new long[rows.Count * t];
        Array.Fill(ids, -1);
        for (var b = 0; b < rows.Count; b++)
        {
            var offset = 0;
            for (var s = 0; s < segments[b].Length; s++)
                for (var i = 0; i < segments[b][s]; i++, offset++)
                {
                    positions[b * t + offset] = i;
                    ids[b * t + offset] = s;
                }
            for (var i = 0; offset < t; i++, offset++) positions[b * t + offset] = i; // padding: its own segment
        }
        return batch with { Positions = positions, Segments = ids };
    }

    public static HostBatch Collate(IReadOnlyList<EncodedExample> examples, int padId)
    {
        var t = examples.Max(e => e.Ids.Length);
        var ids = new long[examples.Count * t];
        var labels = new long[examples.Count * t];
        Array.Fill(ids, padId);
        Array.Fill(labels, EncodedExample.Ignore);
        long tokens = 0, lossTokens = 0;
        for (var b = 0; b < examples.Count; b++)
        {
            var e = examples[b];
            for (var i = 0; i < e.Ids.Length; i++)
            {
                ids[b * t + i] = e.Ids[i];
                labels[b * t + i] = e.Labels[i];
            }
            tokens += e.Ids.Length;
            lossTokens += e.LossTokens;
        }
        return new HostBatch(ids, labels, examples.Count, t, tokens, lossTokens);
    }

    internal static ulong SplitMix64(ref ulong state)
    {
        var z = state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
