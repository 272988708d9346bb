using System.Text;
using FineTune.Domain.Datasets;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Model;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Tests.Training;

/// <summary>UTF-8 bytes as ids 0–255, 256 &lt;|begin_of_text|&gt;, 257 &lt;|end_of_text|&gt;, 258 &lt;|pad|&gt; (the tiny model's layout).</summary>
public sealed class ByteTokenizer : ITokenizer
{
    private static readonly string[] Specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"];
    public int VocabSize => 259;
    public int? BosId => 256;
    public int? EosId => 257;
    public int PadId => 258;

    public int[] Encode(string text, bool addSpecialTokens = false)
    {
        var ids = new List<int>();
        if (addSpecialTokens) ids.Add(256);
        var i = 0;
        while (i < text.Length)
        {
            var special = Array.FindIndex(Specials, s => string.CompareOrdinal(text, i, s, 0, s.Length) == 0);
            if (special >= 0) { ids.Add(256 + special); i += Specials[special].Length; continue; }
            var next = text.IndexOf("<|", i + 1, StringComparison.Ordinal);
            var end = next < 0 ? text.Length : next;
            ids.AddRange(Encoding.UTF8.GetBytes(text[i..end]).Select(b => (int)b));
            i = end;
        }
        return ids.ToArray();
    }

    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        var sb = new StringBuilder();
        var bytes = new List<byte>();
        foreach (var id in ids)
        {
            if (id < 256) { bytes.Add((byte)id); continue; }
            sb.Append(Encoding.UTF8.GetString(bytes.ToArray()));
            bytes.Clear();
            if (!skipSpecialTokens) sb.Append(Specials[id - 256]);
        }
        return sb.Append(Encoding.UTF8.GetString(bytes.ToArray())).ToString();
    }

    public int? TokenToId(string token) => Array.IndexOf(Specials, token) is var i and >= 0 ? 256 + i : null;
}

public static class TestData
{
    /// <summary>Where the training tests run: <c>FINETUNE_TEST_DEVICE=cuda</c> runs them on a GPU host (CPU otherwise).</summary>
    public static Device Device { get; } = Device.Parse(Environment.GetEnvironmentVariable("FINETUNE_TEST_DEVICE") ?? "cpu");

    private static readonly Lazy<string> Tiny = new(() => WriteModel("tiny", seed: 1));

    /// <summary>A tiny Llama folder shared by the tests (written once per test run).</summary>
    public static string TinyModelDir => Tiny.Value;

    public static string WriteModel(string name, long seed, FineTune.Domain.Models.ModelConfig? config = null, int shards = 1,
        ScalarType dtype = ScalarType.Float32)
    {
        var dir = Path.Combine(Path.GetTempPath(), $"ft-training-tests-{Environment.ProcessId}", name);
        TinyModel.Write(dir, seed, config, shards, dtype);
        return dir;
    }

    public static string TempDir(string name)
    {
        var dir = Path.Combine(Path.GetTempPath(), $"ft-training-tests-{Environment.ProcessId}", $"{name}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>A small, very regular text set that a tiny model learns quickly.</summary>
    public static List<DatasetExample> TextSet(int count = 24)
    {
        string[] animals = ["cat", "dog", "fox", "owl", "bee", "elk"];
        string[] colors = ["red", "blue", "green", "gold"];
        var list = new List<DatasetExample>();
        for (var i = 0; i < count; i++)
        {
            var a = animals[i % animals.Length];
            var c = colors[i % colors.Length];
            if (i % 3 == 0) list.Add(new DatasetExample(i + 1, null, $"the {c} {a} sat on the mat. the {c} {a} sat on the mat."));
            else list.Add(new DatasetExample(i + 1, $"Q: what color is the {a}? A:", $" the {a} is {c}."));
        }
        return list;
    }

    public static Tensor Ids(params int[][] rows)
    {
        var t = rows[0].Length;
        return Tensor.From(rows.SelectMany(r => r.Select(x => (long)x)).ToArray(), rows.Length, t);
    }

    /// <summary>Fills every adapter tensor with small random values (zero-init adapters would make tests vacuous).</summary>
    public static void Randomize(FineTune.Worker.Training.Methods.IAdapterMethod method, long seed, double scale = 0.05)
    {
        using var gen = new Generator(seed);
        using var noGrad = global::FineTune.Worker.Torch.Torch.NoGrad();
        foreach (var (_, t) in method.TrainableTensors)
        {
            using var scope = DisposeScope.Begin();
            t.Copy_(Tensor.Randn(t.Shape, gen) * scale);
        }
    }

    public static float MaxAbsDiff(Tensor a, Tensor b)
    {
        using var scope = DisposeScope.Begin();
        return (a - b).Abs().Max().ItemFloat();
    }
}
