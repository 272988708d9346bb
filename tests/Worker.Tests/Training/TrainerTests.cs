using System.Text.Json.Nodes;
using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;

namespace FineTune.Worker.Tests.Training;

[Collection(GlobalGeneratorCollection.Name)]
public sealed class TrainerTests
{
    private sealed class Recorder(Action<TrainingMetrics>? onMetrics = null) : ITrainingReporter
    {
        public long TotalSteps, ResumedFrom = -1;
        public List<TrainingMetrics> Metrics { get; } = [];
        public List<(long Step, string Path, string Sha, long Size)> Checkpoints { get; } = [];
        public List<long> Fenced { get; } = [];

        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct)
        {
            (TotalSteps, ResumedFrom) = (totalSteps, resumedFromStep);
            return ValueTask.CompletedTask;
        }

        public ValueTask OnMetricsAsync(TrainingMetrics metrics, CancellationToken ct)
        {
            Metrics.Add(metrics);
            onMetrics?.Invoke(metrics);
            return ValueTask.CompletedTask;
        }

        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct)
        {
            Fenced.Add(step);
            return ValueTask.CompletedTask;
        }

        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct)
        {
            Checkpoints.Add((step, path, sha256, sizeBytes));
            return ValueTask.CompletedTask;
        }
    }

    private static TrainingSpec Spec(MethodSpec method, Hyperparameters hyper, IReadOnlyList<DatasetExample>? validation = null,
                                     string? resume = null, int logEvery = 1, int checkpointEvery = 1000) =>
        new(TestData.TinyModelDir, new ByteTokenizer(), TestData.TextSet(), validation, method, hyper, TestData.Device, ScalarType.Float32,
            TestData.TempDir("ckpt"), resume, TestData.TempDir("out"), logEvery, checkpointEvery, "tiny-base", "abc123");

    public static TheoryData<string> Methods => new() { "lora", "bone", "vblora", "xgblora", "pissa", "olora", "dora", "lora-plus" };
    public static TheoryData<string> MoreMethods => new() { "bone-mini", "bat-col", "bat-row", "sbora-fa", "sbora-fb" };

    private static MethodSpec TrainingMethod(string name) => name switch
    {
        "lora" => new LoraMethod { R = 8, Alpha = 16, TargetModules = MethodSpec.AllModules },
        "bone" => new BoneMethod { R = 16, TargetModules = MethodSpec.AllModules },
        // gate/up (176 outputs) left out so miniR can be 32.
        "bone-mini" => new BoneMethod { R = 32, Mode = "mini", MiniR = 32, TargetModules = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"] },
        "bat-col" => new BatMethod { R = 16, TargetModules = MethodSpec.AllModules },
        "bat-row" => new BatMethod { R = 16, Grouping = "row", TargetModules = MethodSpec.AllModules },
        // With the paper's dropout 0.05: the loop's dropout path runs too.
        "sbora-fa" => new SboraMethod { R = 16, Alpha = 32, TargetModules = MethodSpec.AllModules },
        "sbora-fb" => new SboraMethod { Variant = "fb", R = 16, Alpha = 32, TargetModules = MethodSpec.AllModules },
        "vblora" => new VbLoraMethod { R = 4, NumVectors = 64, VectorLength = 16, TargetModules = MethodSpec.AllModules, LogitsLearningRate = 0.1, VectorBankLearningRate = 1e-2 },
        "xgblora" => new XgbLoraMethod { Rank = 1, LayersPerRound = 2, StepsPerRound = 10, Alpha = 4, TargetModules = MethodSpec.AllModules },
        "pissa" => new LoraMethod { R = 8, Alpha = 16, Init = "pissa", TargetModules = MethodSpec.AllModules },
        "olora" => new LoraMethod { R = 8, Alpha = 16, Init = "olora", TargetModules = MethodSpec.AllModules },
        "dora" => new DoraMethod { R = 8, Alpha = 16, TargetModules = MethodSpec.AllModules },
        "lora-plus" => new LoraMethod { R = 8, Alpha = 16, LoraPlusRatio = 4, TargetModules = MethodSpec.AllModules },
        _ => throw new ArgumentException(name),
    };

    [Theory, MemberData(nameof(Methods))]
    public async Task Short_run_lowers_the_loss_and_writes_the_adapter_folder(string name)
    {
        var method = TrainingMethod(name);
        // LoRA+ at ratio 4: B keeps the others' 1e-2, A learns 4x slower.
        var lr = method is LoraMethod { LoraPlusRatio: { } ratio } ? 1e-2 / ratio : 1e-2;
        var hyper = new Hyperparameters { BatchSize = 8, LearningRate = lr, MaxSteps = 40, Scheduler = "constant", MaxSeqLength = 128 };
        var recorder = new Recorder();
        var spec = Spec(method, hyper, validation: TestData.TextSet(6), logEvery: 10);
        var result = await new Trainer().RunAsync(spec, recorder, TestContext.Current.CancellationToken);

        Assert.Equal(40, result.Steps);
        Assert.Equal(40, recorder.TotalSteps);
        Assert.Equal(0, recorder.ResumedFrom);
        Assert.Equal([10L, 20, 30, 40], recorder.Metrics.Select(m => m.Step));
        var first = recorder.Metrics[0].Loss;
        Assert.InRange(first, 0.5, 6.5);
        Assert.True(result.FinalLoss < first - 0.3, $"loss went from {first} to {result.FinalLoss}");
        Assert.True(result.FinalValidationLoss < recorder.Metrics[0].ValidationLoss, "validation loss did not fall");
        Assert.All(recorder.Metrics, m => Assert.True(m.TokensPerSecond > 0));
        Assert.True(result.TokensSeen > 40 * 8 * 20);

        Assert.Contains("adapter_model.safetensors", result.Files);
        Assert.Contains("metadata.json", result.Files);
        Assert.Contains("lora/adapter_config.json", result.Files);
        Assert.All(result.Files, f => Assert.True(File.Exists(Path.Combine(spec.OutputDir, f)), f));
        var meta = JsonNode.Parse(File.ReadAllText(Path.Combine(spec.OutputDir, "metadata.json")))!;
        Assert.Equal(method.Type, (string?)meta["method"]!["type"]);
        Assert.Equal(40, (int)meta["hyperparameters"]!["maxSteps"]!);
        Assert.Equal("tiny-base", (string?)meta["base_model"]!["name"]);
        Assert.Equal(64, ((string?)meta["base_model"]!["files"]![0]!["sha256"])!.Length);
        Assert.Equal("abc123", (string?)meta["dataset_sha256"]);
        Assert.Equal(42, (long)meta["seed"]!);
        Assert.Equal(result.FinalLoss, (double)meta["final_loss"]!, 9);
    }

    /// <summary>The other methods on a lighter run (the loop is the same; this checks each one learns and publishes).</summary>
    [Theory, MemberData(nameof(MoreMethods))]
    public async Task Short_run_of_each_method_lowers_the_loss(string name)
    {
        var method = TrainingMethod(name);
        // Mini ties out/miniR outputs to each entry of D, so one Adam step moves many weights at once: a smaller step.
        var hyper = new Hyperparameters { BatchSize = 4, LearningRate = name == "bone-mini" ? 5e-3 : 2e-2, MaxSteps = 20, Scheduler = "constant", MaxSeqLength = 64 };
        var recorder = new Recorder();
        var spec = Spec(method, hyper, logEvery: 5);
        var result = await new Trainer().RunAsync(spec, recorder, TestContext.Current.CancellationToken);
        Assert.Equal(20, result.Steps);
        var first = recorder.Metrics[0].Loss;
        Assert.True(result.FinalLoss < first - 0.2, $"loss went from {first} to {result.FinalLoss}");
        Assert.Contains("lora/adapter_model.safetensors", result.Files);
        var meta = JsonNode.Parse(File.ReadAllText(Path.Combine(spec.OutputDir, "metadata.json")))!;
        Assert.Equal(method.Type, (string?)meta["method"]!["type"]);
        Assert.Equal(name.StartsWith("bat", StringComparison.Ordinal), !(bool)meta["lora_export"]!["exact"]!);
    }

    /// <summary>pissa: the resumed run recomputes the residual W − s·B₀A₀ from the base (A₀, B₀ are not in the
    /// checkpoint) and must continue exactly, down to the rank-2r export that contains A₀ and B₀.</summary>
    [Theory, InlineData("lora"), InlineData("pissa"), InlineData("dora")]
    public async Task Resuming_from_a_checkpoint_continues_exactly(string name)
    {
        string[] targets = ["q_proj", "v_proj", "down_proj"];
        MethodSpec method = name switch
        {
            "pissa" => new LoraMethod { R = 4, Alpha = 8, Dropout = 0.1, Init = "pissa", LoraPlusRatio = 8, TargetModules = targets },
            "dora" => new DoraMethod { R = 4, Alpha = 8, Dropout = 0.1, LoraPlusRatio = 8, TargetModules = targets },
            _ => new LoraMethod { R = 4, Alpha = 8, Dropout = 0.1, TargetModules = targets },
        };
        var hyper = new Hyperparameters
        {
            BatchSize = 3, GradientAccumulationSteps = 2, LearningRate = 5e-3, WarmupSteps = 2, Scheduler = "cosine",
            MaxSteps = 8, WeightDecay = 0.01, MaxGradNorm = 0.5, MaxSeqLength = 48,
        };
        var validation = TestData.TextSet(4);
        var straight = new Recorder();
        var full = Spec(method, hyper, validation, checkpointEvery: 3);
        await new Trainer().RunAsync(full, straight, TestContext.Current.CancellationToken);
        Assert.Equal([3L, 6], straight.Checkpoints.Select(c => c.Step));
        Assert.Equal([3L, 6], straight.Fenced);
        var (_, path, sha, size) = straight.Checkpoints[0];
        Assert.Equal(Path.Combine(full.CheckpointDir, "step-3.safetensors"), path);
        Assert.Equal(Checkpoint.Hash(path), (sha, size));

        var resumed = new Recorder();
        var second = Spec(method, hyper, validation, resume: path, checkpointEvery: 3);
        var result = await new Trainer().RunAsync(second, resumed, TestContext.Current.CancellationToken);
        Assert.Equal(3, resumed.ResumedFrom);
        Assert.Equal(8, result.Steps);
        Assert.Equal([4L, 5, 6, 7, 8], resumed.Metrics.Select(m => m.Step));
        foreach (var m in resumed.Metrics)
        {
            var s = straight.Metrics.Single(x => x.Step == m.Step);
            Assert.Equal(s.Loss, m.Loss, 1e-6);
            Assert.Equal(s.ValidationLoss!.Value, m.ValidationLoss!.Value, 1e-6);
            Assert.Equal(s.LearningRate, m.LearningRate, 12);
        }
        // The adapters end up the same.
        foreach (var file in new[] { "adapter_model.safetensors", "lora/adapter_model.safetensors" })
        {
            var a = Safetensors.Load(Path.Combine(full.OutputDir, file));
            var b = Safetensors.Load(Path.Combine(second.OutputDir, file));
            Assert.Equal(a.Keys.Order(), b.Keys.Order());
            Assert.All(a.Keys, k => Assert.True(TestData.MaxAbsDiff(a[k], b[k]) < 1e-6, k));
        }
    }

    [Theory, InlineData("pissa"), InlineData("dora")]
    public async Task Merge_option_writes_a_hugging_face_model_equal_to_base_plus_adapter(string name)
    {
        var modelDir = TestData.TempDir("merge-base");
        foreach (var f in Directory.EnumerateFiles(TestData.TinyModelDir)) File.Copy(f, Path.Combine(modelDir, Path.GetFileName(f)));
        File.WriteAllText(Path.Combine(modelDir, "tokenizer.json"), "{\"model\": {}}");
        File.WriteAllText(Path.Combine(modelDir, "tokenizer_config.json"), "{}");
        File.WriteAllText(Path.Combine(modelDir, "README.md"), "not part of a model");
        MethodSpec method = name == "pissa"
            ? new LoraMethod { R = 4, Alpha = 8, Init = "pissa", TargetModules = ["q_proj", "o_proj", "up_proj"] }
            : new DoraMethod { R = 4, Alpha = 8, TargetModules = ["q_proj", "o_proj", "up_proj"] };
        var hyper = new Hyperparameters { BatchSize = 4, LearningRate = 1e-2, MaxSteps = 4, MaxSeqLength = 48 };
        var spec = Spec(method, hyper) with { ModelDir = modelDir, Merge = true };
        var result = await new Trainer().RunAsync(spec, new Recorder(), TestContext.Current.CancellationToken);

        Assert.Contains("merged/model.safetensors", result.Files);
        Assert.Contains("merged/config.json", result.Files);
        Assert.Contains("merged/tokenizer.json", result.Files);
        Assert.Contains("merged/tokenizer_config.json", result.Files);
        Assert.DoesNotContain("merged/README.md", result.Files);
        Assert.All(result.Files, f => Assert.True(File.Exists(Path.Combine(spec.OutputDir, f)), f));
        var meta = JsonNode.Parse(File.ReadAllText(Path.Combine(spec.OutputDir, "metadata.json")))!;
        Assert.Equal("merged", (string?)meta["merged"]!["dir"]);
        // bytes counts the tensor data; the file adds its header.
        Assert.InRange(new FileInfo(Path.Combine(spec.OutputDir, "merged", "model.safetensors")).Length - (long)meta["merged"]!["bytes"]!, 8, 1 << 16);
        Assert.Equal(["F32"], meta["merged"]!["dtypes"]!.AsArray().Select(n => (string)n!));

        using var scope = DisposeScope.Begin();
        var ids = MethodTests.Input();
        using var merged = FineTune.Worker.Training.Model.Llama.Load(Path.Combine(spec.OutputDir, "merged"), Device.Cpu, ScalarType.Float32);
        using var model = FineTune.Worker.Training.Model.Llama.Load(modelDir, Device.Cpu, ScalarType.Float32);
        using var adapter = FineTune.Worker.Training.Methods.AdapterMethods.Attach(method, model, seed: 1);
        adapter.Load(spec.OutputDir);
        var expected = model.Forward(ids);
        Assert.True(TestData.MaxAbsDiff(merged.Forward(ids), expected) < 1e-5);
        using var original = FineTune.Worker.Training.Model.Llama.Load(modelDir, Device.Cpu, ScalarType.Float32);
        Assert.True(TestData.MaxAbsDiff(original.Forward(ids), expected) > 1e-4, "training changed nothing");
    }

    /// <summary>XGBLoRA's merged boosters live in the checkpoint's method state: a run resumed mid-round (step 2 of κ = 3)
    /// or exactly at a round boundary (step 6, two rounds merged) re-merges them into the fresh base and continues exactly.</summary>
    [Theory]
    [InlineData(2)]
    [InlineData(6)]
    public async Task Xgblora_resumes_exactly_mid_round_and_at_a_round_boundary(int from)
    {
        var method = new XgbLoraMethod { Rank = 1, LayersPerRound = 1, StepsPerRound = 3, L2 = 1e-3, Shrinkage = 0.7, Alpha = 2, TargetModules = ["q_proj", "up_proj"] };
        var hyper = new Hyperparameters
        {
            BatchSize = 3, GradientAccumulationSteps = 2, LearningRate = 2e-2, WarmupSteps = 1, Scheduler = "cosine",
            MaxSteps = 8, WeightDecay = 0.01, MaxGradNorm = 1.0, MaxSeqLength = 48,
        };
        var validation = TestData.TextSet(4);
        var straight = new Recorder();
        var full = Spec(method, hyper, validation, checkpointEvery: 2);
        await new Trainer().RunAsync(full, straight, TestContext.Current.CancellationToken);
        var path = straight.Checkpoints.Single(c => c.Step == from).Path;
        var keys = SafetensorsFile.Open(path);
        using (keys)
        {
            Assert.Contains("method.rounds", keys.Entries.Keys);
            Assert.Equal(from >= 3, keys.Entries.Keys.Any(k => k.StartsWith("method.model.layers.", StringComparison.Ordinal)));
            if (from >= 3) Assert.Contains(keys.Entries.Keys, k => k.EndsWith(".reset_at", StringComparison.Ordinal));
        }

        var resumed = new Recorder();
        var second = Spec(method, hyper, validation, resume: path, checkpointEvery: 2);
        var result = await new Trainer().RunAsync(second, resumed, TestContext.Current.CancellationToken);
        Assert.Equal(from, resumed.ResumedFrom);
        Assert.Equal(8, result.Steps);
        foreach (var m in resumed.Metrics)
        {
            var s = straight.Metrics.Single(x => x.Step == m.Step);
            Assert.Equal(s.Loss, m.Loss, 1e-6);
            Assert.Equal(s.ValidationLoss!.Value, m.ValidationLoss!.Value, 1e-6);
        }
        var a = Safetensors.Load(Path.Combine(full.OutputDir, "adapter_model.safetensors"));
        var b = Safetensors.Load(Path.Combine(second.OutputDir, "adapter_model.safetensors"));
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        Assert.All(a.Keys, k => Assert.True(TestData.MaxAbsDiff(a[k].To(ScalarType.Float32), b[k].To(ScalarType.Float32)) < 1e-6, k));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(full.OutputDir, "adapter_config.json")))!;
        Assert.Equal(3, (int)config["rounds"]!);     // rounds 0 and 1 merged, round 2 two steps in
    }

    [Fact]
    public async Task A_checkpoint_of_another_job_is_refused()
    {
        var method = new BoneMethod { R = 8, TargetModules = ["q_proj"] };
        var hyper = new Hyperparameters { BatchSize = 2, MaxSteps = 3, MaxSeqLength = 32 };
        var first = new Recorder();
        await new Trainer().RunAsync(Spec(method, hyper, checkpointEvery: 2), first, TestContext.Current.CancellationToken);
        var path = first.Checkpoints.Single().Path;

        var e = await Assert.ThrowsAsync<InvalidDataException>(() => new Trainer().RunAsync(
            Spec(method, hyper with { LearningRate = 1e-3 }, resume: path), new Recorder(), TestContext.Current.CancellationToken));
        Assert.Contains("hyperparameters", e.Message);
        var e2 = await Assert.ThrowsAsync<InvalidDataException>(() => new Trainer().RunAsync(
            Spec(method with { R = 4 }, hyper, resume: path), new Recorder(), TestContext.Current.CancellationToken));
        Assert.Contains("method", e2.Message);
    }

    [Fact]
    public void A_checkpoint_written_before_an_option_existed_still_restores()
    {
        var method = new LoraMethod { R = 4, TargetModules = ["q_proj"] };
        var hyper = new Hyperparameters();
        using var model = FineTune.Worker.Training.Model.Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var adapter = FineTune.Worker.Training.Methods.AdapterMethods.Attach(method, model, 1);
        using var adam = new FineTune.Worker.Torch.Optim.AdamW(adapter.ParamGroups(hyper));
        var path = Checkpoint.Write(TestData.TempDir("old-ckpt"), new LoopState(3, new(0, 6), 100, 0, 0), adapter, adam, 42, hyper, 24);

        // The method as a worker without LoRA's init and loraPlusRatio options wrote it.
        var tensors = Safetensors.Load(path);
        var meta = Safetensors.ReadMetadata(path).ToDictionary();
        var old = JsonNode.Parse(meta["method"])!.AsObject();
        Assert.True(old.Remove("init") && old.Remove("loraPlusRatio"));
        meta["method"] = old.ToJsonString();
        Safetensors.Save(path, tensors, meta);
        Assert.Equal(3, Checkpoint.Restore(path, adapter, adam, hyper, 24).Step);

        // A real difference is still refused.
        using var model2 = FineTune.Worker.Training.Model.Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var other = FineTune.Worker.Training.Methods.AdapterMethods.Attach(method with { Init = "gaussian" }, model2, 1);
        Assert.Throws<InvalidDataException>(() => Checkpoint.Restore(path, other, adam, hyper, 24));
    }

    [Fact]
    public async Task Cancellation_stops_the_loop()
    {
        using var cts = new CancellationTokenSource();
        var recorder = new Recorder(m => { if (m.Step == 2) cts.Cancel(); });
        var spec = Spec(new LoraMethod(), new Hyperparameters { BatchSize = 2, MaxSteps = 50, MaxSeqLength = 32 });
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => new Trainer().RunAsync(spec, recorder, cts.Token));
        Assert.Equal(2, recorder.Metrics.Last().Step);
        Assert.False(File.Exists(Path.Combine(spec.OutputDir, "metadata.json")));
    }

    [Fact]
    public async Task Fencing_failure_aborts_before_the_checkpoint_is_written()
    {
        var spec = Spec(new LoraMethod(), new Hyperparameters { BatchSize = 2, MaxSteps = 5, MaxSeqLength = 32 }, checkpointEvery: 2);
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => new Trainer().RunAsync(spec, new FencedOut(), TestContext.Current.CancellationToken));
        Assert.Equal("lease lost", e.Message);
        Assert.Empty(Directory.EnumerateFiles(spec.CheckpointDir));
    }

    private sealed class FencedOut : ITrainingReporter
    {
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnMetricsAsync(TrainingMetrics metrics, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => throw new InvalidOperationException("lease lost");
        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct) => ValueTask.CompletedTask;
    }

    [Fact]
    public void Sync_free_clipping_matches_the_binding()
    {
        using var gen = new Generator(4);
        var a = new[] { Tensor.Randn([5, 3], gen, requiresGrad: true), Tensor.Randn([7], gen, requiresGrad: true) };
        var b = a.Select(t => t.Detach().Clone().RequiresGrad_()).ToArray();
        using (var scope = DisposeScope.Begin())
        {
            ((a[0] * 3).Sum() + (a[1] * a[1]).Sum()).Backward();
            ((b[0] * 3).Sum() + (b[1] * b[1]).Sum()).Backward();
        }
        Trainer.ClipGradNorm(a, 1.0);
        var norm = FineTune.Worker.Torch.Optim.GradClip.ClipGradNorm(b, 1.0);
        Assert.True(norm > 1.0);
        for (var i = 0; i < a.Length; i++) Assert.True(TestData.MaxAbsDiff(a[i].Grad!, b[i].Grad!) < 1e-6);
        using var s2 = DisposeScope.Begin();
        var total = Math.Sqrt(a.Sum(t => t.Grad!.Square().Sum().ItemDouble()));
        Assert.Equal(1.0, total, 4);
    }
}
