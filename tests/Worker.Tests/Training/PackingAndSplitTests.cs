using System.Text.Json.Nodes;
using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

[Collection(GlobalGeneratorCollection.Name)]
public sealed class PackingAndSplitTests
{
    private static readonly ByteTokenizer Tok = new();
    private const int I = EncodedExample.Ignore;

    private static List<EncodedExample> Encoded(int count = 9) =>
        TrainingData.Encode(TestData.TextSet(count), Tok, 512, out _);

    [Fact]
    public void Packed_loss_equals_the_unpacked_loss_and_needs_the_mask()
    {
        var device = TestData.Device;
        using var model = Llama.Load(TestData.TinyModelDir, device, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 8, TargetModules = MethodSpec.AllModules }, model, seed: 3);
        TestData.Randomize(method, 5);
        method.Train(false); // no dropout: both forward passes must see the same function
        var examples = Encoded(7);
        var (rows, segments) = TrainingData.Pack(examples, 128, seed: 1);
        Assert.True(rows.Count < examples.Count, "nothing was packed together");

        using var scope = DisposeScope.Begin();
        using var noGrad = global::FineTune.Worker.Torch.Torch.NoGrad();
        var unpacked = TrainingData.Collate(examples, Tok.PadId);
        var expected = model.Loss(Tensor.From(unpacked.Ids, unpacked.Rows, unpacked.Length).To(device),
            Tensor.From(unpacked.Labels, unpacked.Rows, unpacked.Length).To(device), "sum").ItemDouble();

        var packed = TrainingData.CollatePacked(rows, segments, Tok.PadId);
        Assert.Equal(unpacked.LossTokens, packed.LossTokens);
        Assert.Equal(unpacked.Tokens, packed.Tokens);
        var ids = Tensor.From(packed.Ids, packed.Rows, packed.Length).To(device);
        var labels = Tensor.From(packed.Labels, packed.Rows, packed.Length).To(device);
        var (positions, mask) = Trainer.PackedInputs(packed, device);
        var actual = model.Loss(ids, labels, "sum", positions, mask).ItemDouble();
        TestContext.Current.TestOutputHelper?.WriteLine($"packed {actual:R} unpacked {expected:R}");
        Assert.True(Math.Abs(actual - expected) <= 1e-5 * Math.Abs(expected), $"packed {actual} vs unpacked {expected}");

        // Without the block-diagonal mask (position resets alone) later examples see earlier ones: a different loss.
        var leaky = model.Loss(ids, labels, "sum", positions, null).ItemDouble();
        TestContext.Current.TestOutputHelper?.WriteLine($"without the mask {leaky:R}");
        Assert.True(Math.Abs(leaky - expected) > 20 * Math.Abs(actual - expected) + 1e-5 * Math.Abs(expected),
            $"the mask made no difference ({leaky} vs {expected})");
    }

    [Fact]
    public void Packed_gradients_equal_the_unpacked_ones()
    {
        var device = TestData.Device;
        using var model = Llama.Load(TestData.TinyModelDir, device, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj", "v_proj"] }, model, seed: 3);
        TestData.Randomize(method, 6);
        method.Train(false);
        var examples = Encoded(5);
        var (rows, segments) = TrainingData.Pack(examples, 256, seed: 2);

        float[][] Grads(HostBatch b)
        {
            using var scope = DisposeScope.Begin();
            var (positions, mask) = Trainer.PackedInputs(b, device);
            model.Loss(Tensor.From(b.Ids, b.Rows, b.Length).To(device), Tensor.From(b.Labels, b.Rows, b.Length).To(device), "sum",
                positions, mask).Backward();
            var grads = method.TrainableTensors.Select(t => t.Tensor.Grad!.To(Device.Cpu).ToArray<float>()).ToArray();
            foreach (var (_, t) in method.TrainableTensors) t.Grad!.Zero_();
            return grads;
        }
        var a = Grads(TrainingData.Collate(examples, Tok.PadId));
        var b = Grads(TrainingData.CollatePacked(rows, segments, Tok.PadId));
        for (var i = 0; i < a.Length; i++)
        {
            var scale = a[i].Max(Math.Abs);
            Assert.True(scale > 0);
            Assert.True(a[i].Zip(b[i]).Max(p => Math.Abs(p.First - p.Second)) <= 1e-4 * scale, $"gradient {method.TrainableTensors[i].Name}");
        }
    }

    [Fact]
    public void Pack_fills_rows_first_fit_decreasing_keeps_every_example_once_and_is_seeded()
    {
        var examples = Encoded(24);
        var (rows, segments) = TrainingData.Pack(examples, 160, seed: 7);
        Assert.All(rows, r => Assert.True(r.Ids.Length <= 160));
        Assert.Equal(examples.Sum(e => e.Ids.Length), rows.Sum(r => r.Ids.Length));
        Assert.Equal(examples.Select(e => e.Ids.Length).Order(), segments.SelectMany(s => s).Order());
        Assert.Equal(examples.Sum(e => e.LossTokens), rows.Sum(r => r.LossTokens));
        // Fewer rows than examples, and no two rows could have been one (first fit: a later row's first example did
        // not fit into any earlier row).
        Assert.True(rows.Count <= examples.Count / 2, $"{rows.Count} rows for {examples.Count} examples");
        for (var r = 1; r < rows.Count; r++)
            Assert.True(rows[r - 1].Ids.Length + segments[r][0] > 160, $"row {r}'s first example fits into row {r - 1}");
        // Every segment starts without a loss on its first token (nothing is predicted across examples).
        foreach (var (row, lengths) in rows.Zip(segments))
        {
            var offset = 0;
            foreach (var len in lengths) { Assert.Equal(I, row.Labels[offset]); offset += len; }
        }
        var again = TrainingData.Pack(examples, 160, seed: 7);
        Assert.Equal(rows.Select(r => r.Ids), again.Rows.Select(r => r.Ids));
    }

    [Fact]
    public void Collate_packed_resets_positions_per_example_and_gives_padding_its_own_segment()
    {
        var a = new EncodedExample(1, [256, 1, 257], [I, 1, 257]);
        var b = new EncodedExample(2, [256, 2], [I, 2]);
        var c = new EncodedExample(3, [256, 3, 4, 257], [I, 3, 4, 257]);
        var row1 = new EncodedExample(1, [.. a.Ids, .. b.Ids], [I, 1, 257, I, 2]);
        var batch = TrainingData.CollatePacked([row1, c], [[3, 2], [4]], 258);
        Assert.Equal((2, 5), (batch.Rows, batch.Length));
        Assert.Equal([0, 1, 2, 0, 1, 0, 1, 2, 3, 0], batch.Positions!);
        Assert.Equal([0, 0, 0, 1, 1, 0, 0, 0, 0, -1], batch.Segments!);

        using var scope = DisposeScope.Begin();
        var mask = Llama.PackedMask(Tensor.From(batch.Segments!, 2, 5)).ToArray<bool>();
        bool M(int row, int i, int j) => mask[row * 25 + i * 5 + j];
        Assert.True(M(0, 2, 0) && M(0, 4, 3) && M(0, 3, 3));
        Assert.False(M(0, 3, 2)); // the second example does not see the first
        Assert.False(M(0, 0, 1)); // causal
        Assert.True(M(1, 4, 4));  // padding attends to itself
        Assert.False(M(1, 4, 3));
    }

    [Fact]
    public void Validation_split_is_seeded_disjoint_and_sized()
    {
        var examples = Encoded(40);
        var (train, validation) = TrainingData.Split(examples, 0.25, seed: 42);
        Assert.Equal(10, validation.Count);
        Assert.Equal(30, train.Count);
        Assert.Empty(train.Select(e => e.Line).Intersect(validation.Select(e => e.Line)));
        Assert.Equal(examples.Select(e => e.Line).Order(), train.Concat(validation).Select(e => e.Line).Order());
        Assert.Equal(validation.Select(e => e.Line), TrainingData.Split(examples, 0.25, seed: 42).Validation.Select(e => e.Line));
        Assert.NotEqual(validation.Select(e => e.Line), TrainingData.Split(examples, 0.25, seed: 43).Validation.Select(e => e.Line));
        // Both keep the file order; a tiny fraction still holds out one example and leaves one to train on.
        Assert.Equal(validation.Select(e => e.Line).Order(), validation.Select(e => e.Line));
        Assert.Single(TrainingData.Split(examples, 0.001, 1).Validation);
        Assert.Single(TrainingData.Split(examples.Take(2).ToList(), 0.5, 1).Train);
        Assert.Throws<DatasetEncodingException>(() => TrainingData.Split(examples.Take(1).ToList(), 0.5, 1));
    }

    [Fact]
    public void Truncation_reject_names_the_line_and_truncate_cuts_and_counts()
    {
        var examples = new List<DatasetExample>
        {
            new(1, "short", " ok"),
            new(2, new string('p', 30), " a long completion that will not fit"),
            new(3, new string('q', 40), "x"), // cut before its completion: nothing left to learn
        };
        var kept = TrainingData.Encode(examples, Tok, 32, Truncation.Truncate, out var skipped, out var truncated);
        Assert.Equal([1, 2], kept.Select(e => e.Line));
        Assert.All(kept, e => Assert.True(e.Ids.Length <= 32));
        Assert.Equal(32, kept[1].Ids.Length);
        Assert.Equal(2, truncated);
        Assert.Equal(1, skipped);

        var e = Assert.Throws<DatasetEncodingException>(() => TrainingData.Encode(examples, Tok, 32, Truncation.Reject, out _, out _));
        Assert.Equal(2, e.Line);
        Assert.Contains("more than maxSeqLength=32", e.Message);
    }

    private sealed class Recorder : ITrainingReporter
    {
        public List<TrainingMetrics> Metrics { get; } = [];
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnMetricsAsync(TrainingMetrics m, CancellationToken ct) { Metrics.Add(m); return ValueTask.CompletedTask; }
        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct) => ValueTask.CompletedTask;
    }

    [Fact]
    public async Task Training_with_packing_a_split_and_evalEvery_records_it_all()
    {
        var hyper = new Hyperparameters
        {
            BatchSize = 2, LearningRate = 1e-2, MaxSteps = 7, Scheduler = "constant", MaxSeqLength = 128, Packing = true,
            ValidationSplit = 0.25, EvalEvery = 3, Truncation = Truncation.Truncate,
        };
        var spec = new TrainingSpec(TestData.TinyModelDir, Tok, TestData.TextSet(), null,
            new LoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj", "v_proj"] }, hyper, TestData.Device, ScalarType.Float32,
            TestData.TempDir("ckpt"), null, TestData.TempDir("out"), LogEvery: 2, CheckpointEvery: 1000, "tiny-base", "abc");
        var recorder = new Recorder();
        var result = await new Trainer().RunAsync(spec, recorder, TestContext.Current.CancellationToken);

        // Rows at every log step (2, 4, 6), every eval step (3, 6) and the end (7); validation only at 3, 6 and 7.
        Assert.Equal([2L, 3, 4, 6, 7], recorder.Metrics.Select(m => m.Step));
        Assert.Equal([3L, 6, 7], recorder.Metrics.Where(m => m.ValidationLoss is not null).Select(m => m.Step));
        Assert.Equal(recorder.Metrics[^1].ValidationLoss, result.FinalValidationLoss);

        var meta = JsonNode.Parse(File.ReadAllText(Path.Combine(spec.OutputDir, "metadata.json")))!;
        Assert.Equal(18, (int)meta["train_examples"]!);
        Assert.Equal(6, (int)meta["validation_examples"]!);
        var data = meta["data"]!;
        Assert.Equal("split", (string?)data["validation"]);
        Assert.True((bool)data["packing"]!);
        Assert.InRange((int)data["rows"]!, 1, 17);
        Assert.Equal(3, (int)data["eval_every"]!);
        Assert.Equal(0.25, (double)data["validation_split"]!);
        Assert.Equal("truncate", (string?)data["truncation"]);
    }
}
