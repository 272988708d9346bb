using FineTune.Domain.Datasets;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Training.Data;

/// <summary>Where the data stream stands: the next example is <c>Order(Epoch)[Index]</c>. Stored in checkpoints.</summary>
public readonly record struct DataPosition(int Epoch, int Index);

/// <summary>A micro-batch on the host: ids and labels (B, T), right-padded with the pad id and label -100.</summary>
public sealed record HostBatch(long[] Ids, long[] Labels, int Rows, int Length, long Tokens, long LossTokens);

/// <summary>
/// The encoded training set as an endless stream of micro-batches over seeded per-epoch shuffles. Batches run on across
/// epoch ends, so the stream is a pure function of (seed, position): a resumed run sees exactly the same batches.
/// </summary>
public sealed class TrainingData
{
    private readonly IReadOnlyList<EncodedExample> _examples;
    private readonly long _seed;
    private readonly Dictionary<int, int[]> _orders = [];
    public int BatchSize { get; }
    public int PadId { get; }
    /// <summary>Examples dropped because truncation left them nothing to learn.</summary>
    public int Skipped { get; }

    public TrainingData(IReadOnlyList<EncodedExample> examples, int batchSize, int padId, long seed, int skipped = 0)
    {
        if (examples.Count == 0) throw new ArgumentException("the dataset has no usable examples");
        (_examples, BatchSize, PadId, _seed, Skipped) = (examples, batchSize, padId, seed, skipped);
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
    public static List<EncodedExample> Encode(IReadOnlyList<DatasetExample> examples, ITokenizer tokenizer, int maxSeqLength, out int skipped)
    {
        var encoded = new List<EncodedExample>(examples.Count);
        skipped = 0;
        foreach (var e in examples)
        {
            var x = ExampleEncoder.Encode(e, tokenizer, maxSeqLength);
            if (x.LossTokens > 0) encoded.Add(x);
            else skipped++;
        }
        return encoded;
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
    public IReadOnlyList<EncodedExample> Next(ref DataPosition position)
    {
        var batch = new List<EncodedExample>(BatchSize);
        while (batch.Count < BatchSize)
        {
            var order = Order(position.Epoch);
            batch.Add(_examples[order[position.Index]]);
            position = position.Index + 1 < order.Length ? position with { Index = position.Index + 1 } : new DataPosition(position.Epoch + 1, 0);
        }
        return batch;
    }

    public HostBatch NextBatch(ref DataPosition position) => Collate(Next(ref position), PadId);

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
