using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>
/// The training path's speed and memory changes compute what the plain path computes: the fused linear +
/// cross-entropy, activation checkpointing, grouped-query attention in the kernel, bf16 adapters, asynchronous
/// uploads and per-device seeding. Equality checks only; speed is measured by the benchmark, not asserted.
/// </summary>
[Collection(GlobalGeneratorCollection.Name)]
public sealed class PerformanceTests
{
    private static readonly Device Dev = TestData.Device;
    /// <summary>fp32 on the CPU recomputes bit for bit; CUDA's attention backward may reorder sums.</summary>
    private static readonly double Tol = Dev.Kind == DeviceKind.Cpu ? 1e-6 : 1e-5;

    private static MethodSpec Spec(string name) => name switch
    {
        "lora" => new LoraMethod { R = 4, Alpha = 8, Dropout = 0.1, TargetModules = MethodSpec.AllModules },
        "bone" => new BoneMethod { R = 16, TargetModules = MethodSpec.AllModules },
        _ => throw new ArgumentException(name),
    };

    public static TheoryData<string> Methods => new() { "lora", "bone" };

    private static Tensor Batch() => TestData.Ids(
        [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100],
        [256, 98, 121, 116, 101, 115, 32, 97, 110, 100, 258, 258]).To(Dev);

    private static Tensor Labels(Tensor ids) => ids.MaskedFill(ids.Eq(258), -100);

    /// <summary>max |a − b| over max(1, max |b|).</summary>
    private static double RelDiff(Tensor a, Tensor b)
    {
        using var scope = DisposeScope.Begin();
        var scale = Math.Max(1.0, b.Abs().Max().ItemDouble());
        return (a.To(ScalarType.Float64) - b.To(ScalarType.Float64)).Abs().Max().ItemDouble() / scale;
    }

    [Theory]
    [InlineData(0L)]   // automatic chunk size: one chunk here
    [InlineData(3L)]   // several chunks, the last one short
    public void Linear_cross_entropy_equals_cross_entropy_of_the_logits_with_gradients(long chunk)
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(5, Dev);
        var h = Tensor.Randn([10, 6], gen, device: Dev).RequiresGrad_();
        var w = Tensor.Randn([13, 6], gen, device: Dev).RequiresGrad_();
        var targets = Tensor.From(new long[] { 3, -100, 0, 12, 7, 7, -100, 1, 5, 2 }).To(Dev);

        var fused = F.LinearCrossEntropy(h, w, targets, -100, chunk);
        (fused * 0.5).Backward();
        var (gh, gw) = (h.Grad!, w.Grad!);

        var h2 = h.Detach().RequiresGrad_();
        var w2 = w.Detach().RequiresGrad_();
        var reference = F.CrossEntropy(F.Linear(h2, w2), targets, -100, "sum");
        (reference * 0.5).Backward();

        Assert.True(RelDiff(fused, reference) < 1e-6, $"loss {fused.ItemDouble()} vs {reference.ItemDouble()}");
        Assert.True(RelDiff(gh, h2.Grad!) < 1e-6, "d/d hidden");
        Assert.True(RelDiff(gw, w2.Grad!) < 1e-6, "d/d weight");

        // Without autograd it is the same value (no gradient is computed or kept).
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
            Assert.True(RelDiff(F.LinearCrossEntropy(h, w, targets, -100, chunk), reference) < 1e-6);
    }

    [Fact]
    public void Model_loss_through_the_fused_head_equals_the_logits_path_with_adapter_gradients()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Dev, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 8, TargetModules = MethodSpec.AllModules }, model, seed: 3);
        TestData.Randomize(method, 9);
        using var scope = DisposeScope.Begin();
        var ids = Batch();
        var labels = Labels(ids);

        var fusedMean = model.Loss(ids, labels, "mean");
        fusedMean.Backward();
        var fusedGrads = method.TrainableTensors.Select(t => t.Tensor.Grad!.Clone()).ToList();
        foreach (var (_, t) in method.TrainableTensors) t.Grad!.Zero_();   // accumulate the reference into zeroed grads
        var referenceMean = model.LossFromLogits(ids, labels, "mean");
        referenceMean.Backward();

        Assert.True(RelDiff(fusedMean, referenceMean) < 1e-6, $"{fusedMean.ItemDouble()} vs {referenceMean.ItemDouble()}");
        for (var i = 0; i < fusedGrads.Count; i++)
            Assert.True(RelDiff(fusedGrads[i], method.TrainableTensors[i].Tensor.Grad!) < 1e-5, method.TrainableTensors[i].Name);
        Assert.True(RelDiff(model.Loss(ids, labels, "sum"), model.LossFromLogits(ids, labels, "sum")) < 1e-6);
    }

    [Theory, MemberData(nameof(Methods))]
    public void Gradient_checkpointing_gives_the_same_loss_and_gradients(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Dev, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Spec(name), model, seed: 3);
        TestData.Randomize(method, 4);
        var ids = Batch();
        var labels = Labels(ids);

        (double Loss, List<Tensor> Grads) Run(bool checkpoint)
        {
            model.GradientCheckpointing = checkpoint;
            // The same seed before each run: LoRA's dropout masks must be redrawn identically by the recompute.
            global::FineTune.Worker.Torch.Torch.ManualSeed(77, Dev);
            using var scope = DisposeScope.Begin();
            var loss = model.Loss(ids, labels, "mean");
            loss.Backward();
            var grads = method.TrainableTensors.Select(t => DisposeScope.Keep(t.Tensor.Grad!.Clone())).ToList();
            foreach (var (_, t) in method.TrainableTensors) t.Grad!.Zero_();
            return (loss.ItemDouble(), grads);
        }

        var plain = Run(false);
        var recomputed = ActivationCheckpoint.Recomputations;
        var checkpointed = Run(true);
        Assert.True(ActivationCheckpoint.Recomputations - recomputed >= model.Config.NumHiddenLayers, "backward did not recompute the layers");
        Assert.True(Math.Abs(plain.Loss - checkpointed.Loss) <= Tol * Math.Max(1, Math.Abs(plain.Loss)), $"{plain.Loss} vs {checkpointed.Loss}");
        for (var i = 0; i < plain.Grads.Count; i++)
        {
            Assert.True(plain.Grads[i].Abs().Sum().ItemDouble() > 0, $"{method.TrainableTensors[i].Name}: zero gradient");
            Assert.True(RelDiff(checkpointed.Grads[i], plain.Grads[i]) <= Tol, method.TrainableTensors[i].Name);
        }

        // Under no-grad (validation) checkpointing is bypassed and the loss is the same.
        using (DisposeScope.Begin())
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
        {
            global::FineTune.Worker.Torch.Torch.ManualSeed(77, Dev);
            method.Train(false);
            var eval = model.Loss(ids, labels, "mean").ItemDouble();
            model.GradientCheckpointing = false;
            Assert.Equal(model.Loss(ids, labels, "mean").ItemDouble(), eval, 6);
            method.Train(true);
        }
        foreach (var g in plain.Grads.Concat(checkpointed.Grads)) g.Dispose();
        ids.Dispose();
        labels.Dispose();
    }

    [Fact]
    public void An_exception_in_a_checkpointed_function_is_a_torch_exception_not_a_crash()
    {
        var id = ActivationCheckpoint.Register(_ => throw new InvalidOperationException("layer exploded"));
        try
        {
            using var scope = DisposeScope.Begin();
            var x = Tensor.Ones([2, 3], device: Dev).RequiresGrad_();
            var e = Assert.Throws<TorchException>(() => ActivationCheckpoint.Run(id, x));
            Assert.Contains("layer exploded", e.Message);
        }
        finally { ActivationCheckpoint.Unregister(id); }
    }

    [Fact]
    public void Checkpointed_function_with_several_inputs_and_outputs_backpropagates_into_inputs_and_captured_leaves()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(8, Dev);
        var w = DisposeScope.Keep(Tensor.Randn([3, 3], gen, device: Dev).RequiresGrad_());   // a leaf the function captures
        var id = ActivationCheckpoint.Register(xs => [(xs[0].MatMul(w) * xs[1]).Tanh(), xs[0].Sum()]);
        try
        {
            var a = Tensor.Randn([4, 3], gen, device: Dev).RequiresGrad_();
            var b = Tensor.Randn([4, 3], gen, device: Dev);           // no grad: gets none
            var outs = ActivationCheckpoint.Run(id, a, b);
            (outs[0].Sum() + outs[1] * 2.0).Backward();
            var (ga, gw) = (a.Grad!, w.Grad!);

            var a2 = a.Detach().RequiresGrad_();
            var w2 = w.Detach().RequiresGrad_();
            ((a2.MatMul(w2) * b).Tanh().Sum() + a2.Sum() * 2.0).Backward();
            Assert.True(RelDiff(ga, a2.Grad!) < 1e-6);
            Assert.True(RelDiff(gw, w2.Grad!) < 1e-6);
            Assert.Null(b.Grad);
        }
        finally
        {
            ActivationCheckpoint.Unregister(id);
            w.Dispose();
        }
    }

    [Fact]
    public void Grouped_query_attention_equals_attention_over_repeated_kv_heads()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(6, Dev);
        long b = 2, h = 6, hkv = 2, t = 5, d = 4;
        var q = Tensor.Randn([b, h, t, d], gen, device: Dev);
        var k = Tensor.Randn([b, hkv, t, d], gen, device: Dev);
        var v = Tensor.Randn([b, hkv, t, d], gen, device: Dev);
        // HF repeat_kv: query head i uses kv head i / (h / hkv).
        Tensor Repeat(Tensor x) => x.Unsqueeze(2).Expand(b, hkv, h / hkv, t, d).Reshape(b, h, t, d);
        var expected = F.ScaledDotProductAttention(q, Repeat(k), Repeat(v), isCausal: true);
        Assert.True(RelDiff(F.GroupedQueryAttention(q, k, v, isCausal: true), expected) < 1e-5);
        Assert.Throws<TorchException>(() => F.GroupedQueryAttention(q, Tensor.Randn([b, 4, t, d], device: Dev), Tensor.Randn([b, 4, t, d], device: Dev)));
    }

    public static TheoryData<string> Bf16Methods => new() { "lora", "bone", "bat" };

    [Theory, MemberData(nameof(Bf16Methods))]
    public async Task Bf16_adapters_train_and_are_saved_in_bf16(string name)
    {
        var hyper = new Hyperparameters { BatchSize = 8, LearningRate = 1e-2, MaxSteps = 12, Scheduler = "constant", MaxSeqLength = 64, AdapterDtype = "bf16" };
        MethodSpec method = name switch
        {
            "lora" => new LoraMethod { R = 8, Alpha = 16, TargetModules = MethodSpec.AllModules },
            "bone" => new BoneMethod { R = 16, TargetModules = MethodSpec.AllModules },
            _ => new BatMethod { R = 16, TargetModules = MethodSpec.AllModules },
        };
        Assert.True(method.SupportsBf16Adapters);
        var spec = new TrainingSpec(TestData.TinyModelDir, new ByteTokenizer(), TestData.TextSet(), null,
            method, hyper, Dev, ScalarType.Float32,
            TestData.TempDir("ckpt"), null, TestData.TempDir("out"), LogEvery: 4, CheckpointEvery: 1000);
        var metrics = new List<TrainingMetrics>();
        var result = await new Trainer().RunAsync(spec, new MetricsRecorder(metrics), TestContext.Current.CancellationToken);
        Assert.True(result.FinalLoss < metrics[0].Loss, $"loss {metrics[0].Loss} -> {result.FinalLoss}");
        var saved = Safetensors.Load(Path.Combine(spec.OutputDir, "adapter_model.safetensors"));
        Assert.NotEmpty(saved);
        Assert.All(saved.Values, t => Assert.Equal(ScalarType.BFloat16, t.DType));
        foreach (var t in saved.Values) t.Dispose();
    }

    /// <summary>The fused LoRA linear (one node: the LoRA GEMM adds into the base output, and x's gradient gets the
    /// adapter's share inside a GEMM) against the composed ops: values and the gradients of x, A and B; fp32
    /// throughout, bf16 math over fp32 masters, and all-bf16.</summary>
    [Theory]
    [InlineData(ScalarType.Float32, ScalarType.Float32, 1e-5)]
    [InlineData(ScalarType.BFloat16, ScalarType.Float32, 2e-2)]
    [InlineData(ScalarType.BFloat16, ScalarType.BFloat16, 2e-2)]
    public void Fused_lora_linear_equals_the_composed_ops(ScalarType compute, ScalarType adapter, double tol)
    {
        using var scope = DisposeScope.Begin();
        var gen = new Generator(11);
        var w = Tensor.Randn([24, 16], gen).To(Dev, compute);
        var x0 = Tensor.Randn([2, 5, 16], gen).To(Dev, compute);
        var a0 = (Tensor.Randn([4, 16], gen) * 0.3).To(Dev, adapter);
        var b0 = (Tensor.Randn([24, 4], gen) * 0.3).To(Dev, adapter);
        var bias = Tensor.Randn([24], gen).To(Dev, compute);
        var upstream = Tensor.Randn([2, 5, 24], gen).To(Dev, compute);
        (Tensor Y, Tensor Gx, Tensor Ga, Tensor Gb) Run(bool fused)
        {
            var x = x0.Clone().RequiresGrad_();
            var a = a0.Clone().RequiresGrad_();
            var b = b0.Clone().RequiresGrad_();
            var y = fused
                ? AdapterOps.LoraLinear(x, w, bias, a, b, 1.5)
                : F.Linear(x, w, bias) + F.Linear(F.Linear(x, a.To(compute)), b.To(compute)) * 1.5;
            (y * upstream).Sum().Backward();
            return (y.Detach(), x.Grad!, a.Grad!, b.Grad!);
        }
        var (ey, egx, ega, egb) = Run(fused: false);
        var (fy, fgx, fga, fgb) = Run(fused: true);
        Assert.Equal(adapter, fga.DType);
        Assert.Equal(adapter, fgb.DType);
        Assert.Equal(compute, fy.DType);
        Assert.True(RelDiff(fy, ey) < tol, $"y {RelDiff(fy, ey)}");
        Assert.True(RelDiff(fgx, egx) < tol, $"dx {RelDiff(fgx, egx)}");
        Assert.True(RelDiff(fga, ega) < tol, $"dA {RelDiff(fga, ega)}");
        Assert.True(RelDiff(fgb, egb) < tol, $"dB {RelDiff(fgb, egb)}");
        // Mismatched shapes are an error, not a crash.
        Assert.Throws<TorchException>(() => AdapterOps.LoraLinear(x0, w, null, a0, Tensor.Zeros([23, 4], adapter, Dev), 1.0));
        Assert.Throws<TorchException>(() => AdapterOps.LoraLinear(x0, w.Clone().RequiresGrad_(), null, a0, b0, 1.0));
    }

    public static TheoryData<string> MixedMethods => new() { "lora", "dora", "bone", "vblora", "sbora-fa", "sbora-fb", "xgblora" };

    /// <summary>adapterDtype mixed on a bf16 base: the tensors and their gradients stay fp32, the loss and the gradients
    /// agree with the fp32 path to bf16's rounding, and the math really ran in bf16 (the results are not the fp32 ones).</summary>
    [Theory, MemberData(nameof(MixedMethods))]
    public void Mixed_precision_keeps_fp32_tensors_and_agrees_with_the_fp32_path(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Dev, ScalarType.BFloat16);
        MethodSpec spec = name switch
        {
            "lora" => new LoraMethod { R = 4, Alpha = 8, TargetModules = MethodSpec.AllModules },
            "bone" => new BoneMethod { R = 16, TargetModules = MethodSpec.AllModules },
            "dora" => new DoraMethod { R = 4, Alpha = 8, Dropout = 0, TargetModules = MethodSpec.AllModules },
            "sbora-fa" => new SboraMethod { R = 4, Variant = "fa", Dropout = 0, TargetModules = MethodSpec.AllModules },
            "sbora-fb" => new SboraMethod { R = 4, Variant = "fb", Dropout = 0, TargetModules = MethodSpec.AllModules },
            // Every layer in the round, so every booster gets a gradient.
            "xgblora" => new XgbLoraMethod { Rank = 2, LayersPerRound = 64, TargetModules = MethodSpec.AllModules },
            _ => new VbLoraMethod { R = 4, NumVectors = 16, VectorLength = 16, TargetModules = MethodSpec.AllModules },
        };
        Assert.True(spec.SupportsMixedAdapters);
        using var method = AdapterMethods.Attach(spec, model, seed: 3);
        using (FineTune.Worker.Torch.Torch.NoGrad())
        {
            var gen = new Generator(7);
            // Zero-initialised tensors (LoRA's B, Bone's D) would hide the adapter's own product: fill every tensor.
            foreach (var (_, t) in method.TrainableTensors)
            {
                using var scope = DisposeScope.Begin();
                t.Copy_(Tensor.Randn(t.Shape, gen).To(Dev) * 0.05);
            }
        }
        (double Loss, List<Tensor> Grads) Run(string dtype)
        {
            Trainer.SetAdapterPrecision(method, dtype);
            using var scope = DisposeScope.Begin();
            using (var opt = new AdamW([new ParamGroup("all", method.TrainableTensors.Select(t => t.Tensor).ToList(), 1e-3, 0)])) opt.ZeroGrad();
            method.BeginStep(0);
            var ids = Batch();
            var loss = model.Loss(ids, Labels(ids));
            loss.Backward();
            method.EndBackward();
            Assert.All(method.TrainableTensors, t => Assert.Equal(ScalarType.Float32, t.Tensor.DType));
            Assert.All(method.TrainableTensors, t => Assert.Equal(ScalarType.Float32, t.Tensor.Grad!.DType));
            return (loss.ItemDouble(), method.TrainableTensors.Select(t => DisposeScope.Keep(t.Tensor.Grad!.Clone())).ToList());
        }
        var (fp32Loss, fp32Grads) = Run("fp32");
        var (mixedLoss, mixedGrads) = Run("mixed");
        Assert.True(Math.Abs(mixedLoss - fp32Loss) < 2e-2 * Math.Abs(fp32Loss), $"loss {mixedLoss} vs {fp32Loss}");
        Assert.NotEqual(fp32Loss, mixedLoss);
        var worst = fp32Grads.Zip(mixedGrads, RelDiff).Max();
        Assert.True(worst < 0.1, $"gradient relative difference {worst}");
        Assert.True(fp32Grads.Zip(mixedGrads, RelDiff).Any(d => d > 0), "mixed gradients are bit-identical to fp32's: the mixed path did not run");
        foreach (var g in fp32Grads.Concat(mixedGrads)) g.Dispose();
    }

    [Fact]
    public void Auto_adapter_precision_is_mixed_where_the_method_supports_it()
    {
        Assert.Equal("auto", new Hyperparameters().AdapterDtype);
        Assert.Equal("mixed", new LoraMethod().EffectiveAdapterDtype("auto"));
        Assert.Equal("mixed", new DoraMethod().EffectiveAdapterDtype("auto"));
        Assert.All(MethodSpec.Registered, r => Assert.Equal(MethodSpec.Default(r.Type).SupportsMixedAdapters ? "mixed" : "fp32",
            MethodSpec.Default(r.Type).EffectiveAdapterDtype("auto")));
        Assert.Equal("bf16", new LoraMethod().EffectiveAdapterDtype("bf16"));
        Assert.All(MethodSpec.Registered, r => Assert.Empty(MethodSpec.Default(r.Type).ValidateWith(new Hyperparameters())));
        Assert.NotEmpty(new SboraMethod().ValidateWith(new Hyperparameters { AdapterDtype = "bf16" }));
        using var model = Llama.Load(TestData.TinyModelDir, Dev, ScalarType.Float32);
        using var lora = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj"] }, model, seed: 1);
        Trainer.SetAdapterPrecision(lora, "auto");
        Assert.All(lora.Layers.Values, l => Assert.True(l.Mixed));
        Assert.All(lora.TrainableTensors, t => Assert.Equal(ScalarType.Float32, t.Tensor.DType));
        Trainer.SetAdapterPrecision(lora, "fp32");
        Assert.All(lora.Layers.Values, l => Assert.False(l.Mixed));
    }

    [Fact]
    public void Set_adapter_precision_changes_the_tensors_in_place_and_rejects_unknown_names()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Dev, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj", "down_proj"] }, model, seed: 1);
        var before = method.TrainableTensors.Select(t => t.Tensor).ToList();
        Trainer.SetAdapterPrecision(method, "bf16");
        Assert.All(method.TrainableTensors, t => Assert.Equal(ScalarType.BFloat16, t.Tensor.DType));
        Assert.Equal(before, method.TrainableTensors.Select(t => t.Tensor));   // the same objects the layers hold
        using (DisposeScope.Begin())
        {
            var ids = Batch();
            model.Loss(ids, Labels(ids)).Backward();
            Assert.All(method.TrainableTensors, t => Assert.Equal(ScalarType.BFloat16, t.Tensor.Grad!.DType));
        }
        Assert.Throws<ArgumentException>(() => Trainer.SetAdapterPrecision(method, "fp8"));
        Assert.Contains(new Hyperparameters { AdapterDtype = "fp8" }.Validate(), e => e.Field == "hyperparameters.adapterDtype");
    }

    [Fact]
    public void Async_upload_equals_a_plain_copy_and_device_seeding_matches_global_seeding_on_that_device()
    {
        using var scope = DisposeScope.Begin();
        long[] data = [1, 2, 3, 4, 5, 6];
        var t = Tensor.FromAsync<long>(data, [2, 3], Dev);
        Assert.Equal(Dev, t.Device);
        Assert.Equal(data, t.ToArray<long>());

        global::FineTune.Worker.Torch.Torch.ManualSeed(123);
        var a = Tensor.Randn([8], device: Dev).ToArray<float>();
        global::FineTune.Worker.Torch.Torch.ManualSeed(123, Dev);
        var b = Tensor.Randn([8], device: Dev).ToArray<float>();
        Assert.Equal(a, b);
    }

    private sealed class MetricsRecorder(List<TrainingMetrics> metrics) : ITrainingReporter
    {
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnMetricsAsync(TrainingMetrics m, CancellationToken ct) { metrics.Add(m); return ValueTask.CompletedTask; }
        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct) => ValueTask.CompletedTask;
    }
}
