using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Methods.Bat;
using FineTune.Worker.Training.Methods.Bone;
using FineTune.Worker.Training.Methods.SBoRA;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>Bone mini, Bat (col and row, and its fused operator) and SBoRA: what the shared method theories in
/// <see cref="MethodTests"/> do not cover.</summary>
public sealed class BoneFamilyTests
{
    private static readonly string[] All = MethodSpec.AllModules;
    private static Tensor Input() => TestData.Ids([256, 72, 101, 108, 108, 111, 32, 119], [256, 98, 121, 116, 101, 115, 258, 258]);

    // ------------------------------------------------------------------ Bat operator

    public static TheoryData<string, bool> BatCases => new() { { "col", false }, { "col", true }, { "row", false }, { "row", true } };

    /// <summary>The fused op against the reference: W' materialised with PEFT's reshape/permute formula in plain tensor
    /// ops, then F.Linear, differentiated by autograd. Non-square (48, 32) weight, r = 8, 3-D input. Runs on
    /// <see cref="TestData.Device"/> (FINETUNE_TEST_DEVICE=cuda checks the CUDA build).</summary>
    [Theory, MemberData(nameof(BatCases))]
    public void Bat_operator_forward_and_gradients_equal_the_materialised_formula(string grouping, bool withBias)
    {
        var g = grouping == "row" ? BatGrouping.Row : BatGrouping.Col;
        const int outF = 48, inF = 32, r = 8;
        using var gen = new Generator(21);
        using var scope = DisposeScope.Begin();
        var dev = TestData.Device;
        var w = (Tensor.Randn([outF, inF], gen) * 0.5).To(dev);
        var blocks = (g == BatGrouping.Col ? outF : inF) / r;
        var d0 = (Tensor.Randn([blocks, r, r], gen) * 0.1).To(dev);
        var b0 = Tensor.Randn([outF], gen).To(dev);
        var x0 = Tensor.Randn([3, 5, inF], gen).To(dev);
        var gy = Tensor.Randn([3, 5, outF], gen).To(dev);

        (Tensor Y, Tensor Gx, Tensor Gd, Tensor? Gb) Run(bool fused)
        {
            var x = x0.Clone().RequiresGrad_();
            var d = d0.Clone().RequiresGrad_();
            var b = withBias ? b0.Clone().RequiresGrad_() : null;
            var y = fused ? AdapterOps.BatLinear(x, w, b, d, g) : F.Linear(x, BatLayer.Adapted(w, d, g), b);
            (y * gy).Sum().Backward();
            return (y.Detach(), x.Grad!, d.Grad!, b?.Grad);
        }

        var fusedRun = Run(fused: true);
        var reference = Run(fused: false);
        Assert.Equal(reference.Y.Shape, fusedRun.Y.Shape);
        Assert.True(TestData.MaxAbsDiff(fusedRun.Y, reference.Y) < 1e-5, "forward");
        Assert.True(TestData.MaxAbsDiff(fusedRun.Gx, reference.Gx) < 1e-5, "grad x");
        Assert.True(TestData.MaxAbsDiff(fusedRun.Gd, reference.Gd) < 1e-4 * Math.Max(1, reference.Gd.Abs().Max().ItemDouble()), "grad D");
        Assert.True(reference.Gd.Abs().Sum().ItemDouble() > 0);
        if (withBias) Assert.True(TestData.MaxAbsDiff(fusedRun.Gb!, reference.Gb!) < 1e-5, "grad b");
        // D = 0 is the identity: the op is then the plain linear.
        var zero = Tensor.Zeros(d0.Shape, device: dev);
        var identity = TestData.MaxAbsDiff(AdapterOps.BatLinear(x0, w, withBias ? b0 : null, zero, g), F.Linear(x0, w, withBias ? b0 : null));
        Assert.True(identity < 1e-5, $"D = 0 differs from the plain linear by {identity}");
    }

    /// <summary>bf16 compute with an fp32 master D (the GPU setting): W' is built in bf16, D's gradient comes back in fp32,
    /// and both agree with the fp32 reference to bf16 precision.</summary>
    [Theory, InlineData("col"), InlineData("row")]
    public void Bat_operator_in_bf16_keeps_an_fp32_block_gradient(string grouping)
    {
        var g = grouping == "row" ? BatGrouping.Row : BatGrouping.Col;
        using var gen = new Generator(31);
        using var scope = DisposeScope.Begin();
        var dev = TestData.Device;
        var w = (Tensor.Randn([32, 48], gen) * 0.5).To(dev);
        var d = (Tensor.Randn([(g == BatGrouping.Col ? 32 : 48) / 16, 16, 16], gen) * 0.1).To(dev).RequiresGrad_();
        var dRef = d.Detach().Clone().RequiresGrad_();
        var x = Tensor.Randn([4, 48], gen).To(dev);
        var y = AdapterOps.BatLinear(x.To(ScalarType.BFloat16), w.To(ScalarType.BFloat16), null, d, g);
        Assert.Equal(ScalarType.BFloat16, y.DType);
        y.To(ScalarType.Float32).Sum().Backward();
        var reference = F.Linear(x, BatLayer.Adapted(w, dRef, g));
        reference.Sum().Backward();
        var grad = d.Grad!;
        Assert.Equal(ScalarType.Float32, grad.DType);
        double Rel(Tensor a, Tensor b) => (a.To(ScalarType.Float32) - b).Norm().ItemDouble() / b.Norm().ItemDouble();
        Assert.InRange(Rel(y, reference.Detach()), 0, 2e-2);
        Assert.InRange(Rel(grad, dRef.Grad!), 0, 2e-2);
    }

    /// <summary>W' = W + ΔW rounded to bf16 loses the part of a small ΔW below W's ulp; measured against the exact fp32
    /// output, that error is the same order as a bf16 LoRA's (bf16 base output + fp32 Δy, rounded once), which every
    /// bf16 method pays. Guards the choice of building W' in the compute dtype.</summary>
    [Theory, InlineData(1e-4), InlineData(1e-3), InlineData(1e-2)]
    public void Bat_operator_in_bf16_is_as_precise_as_a_bf16_lora_output(double sigma)
    {
        using var gen = new Generator(1);
        using var scope = DisposeScope.Begin();
        var dev = TestData.Device;
        var w = (Tensor.Randn([256, 256], gen) * 0.02).To(ScalarType.BFloat16).To(dev);   // a bf16 base, exactly
        var w32 = w.To(ScalarType.Float32);
        var x = Tensor.Randn([64, 256], gen).To(ScalarType.BFloat16).To(dev);
        var x32 = x.To(ScalarType.Float32);
        var d = (Tensor.Randn([16, 16, 16], gen) * sigma).To(dev);
        var exact = F.Linear(x32, BatLayer.Adapted(w32, d, BatGrouping.Col));
        var dy = exact - F.Linear(x32, w32);
        var fused = AdapterOps.BatLinear(x, w, null, d, BatGrouping.Col).To(ScalarType.Float32);
        var loraLike = (F.Linear(x, w).To(ScalarType.Float32) + dy).To(ScalarType.BFloat16).To(ScalarType.Float32);
        double Error(Tensor y) => (y - exact).Norm().ItemDouble() / dy.Norm().ItemDouble();
        Assert.True(Error(fused) < 1.5 * Error(loraLike), $"fused {Error(fused):E2} vs lora-like {Error(loraLike):E2} of |Δy|");
    }

    [Fact]
    public void Bat_operator_gradient_of_D_alone_matches_with_x_frozen()
    {
        using var gen = new Generator(5);
        using var scope = DisposeScope.Begin();
        var w = Tensor.Randn([16, 24], gen);
        var x = Tensor.Randn([7, 24], gen);
        var d = (Tensor.Randn([3, 8, 8], gen) * 0.1).RequiresGrad_();
        var dRef = d.Detach().Clone().RequiresGrad_();
        AdapterOps.BatLinear(x, w, null, d, BatGrouping.Row).Square().Sum().Backward();
        F.Linear(x, BatLayer.Adapted(w, dRef, BatGrouping.Row)).Square().Sum().Backward();
        // Relative to the gradient's size (entries reach ~1e2): fp32 sums in another order (a multithreaded BLAS on the
        // GPU host) differ by more than 1e-4 in absolute terms.
        var scale = dRef.Grad!.Abs().Max().ItemDouble();
        Assert.True(TestData.MaxAbsDiff(d.Grad!, dRef.Grad!) < 1e-5 * scale, $"{TestData.MaxAbsDiff(d.Grad!, dRef.Grad!)} vs scale {scale}");
    }

    [Fact]
    public void Bat_operator_rejects_bad_shapes_and_a_trainable_base()
    {
        using var scope = DisposeScope.Begin();
        var w = Tensor.Zeros([16, 24]);
        var x = Tensor.Zeros([2, 24]);
        var e = Assert.Throws<TorchException>(() => AdapterOps.BatLinear(x, w, null, Tensor.Zeros([3, 8, 8]), BatGrouping.Col));
        Assert.Contains("(2, 8, 8)", e.Message);
        Assert.Throws<TorchException>(() => AdapterOps.BatLinear(x, w, null, Tensor.Zeros([2, 5, 5]), BatGrouping.Col));
        Assert.Throws<TorchException>(() => AdapterOps.BatLinear(Tensor.Zeros([2, 16]), w, null, Tensor.Zeros([2, 8, 8]), BatGrouping.Col));
        var trainable = Tensor.Zeros([16, 24], requiresGrad: true);
        Assert.Contains("frozen", Assert.Throws<TorchException>(() => AdapterOps.BatLinear(x, trainable, null, Tensor.Zeros([2, 8, 8]), BatGrouping.Col)).Message);
    }

    [Theory, InlineData("col"), InlineData("row")]
    public void Bat_unmerge_formula_inverts_the_merge(string grouping)
    {
        var g = grouping == "row" ? BatGrouping.Row : BatGrouping.Col;
        using var gen = new Generator(8);
        using var scope = DisposeScope.Begin();
        var w = Tensor.Randn([32, 48], gen);
        var d = Tensor.Randn([(g == BatGrouping.Col ? 32 : 48) / 8, 8, 8], gen) * 0.2;
        var merged = BatLayer.Adapted(w, d, g);
        Assert.True(TestData.MaxAbsDiff(merged, w) > 1e-2);
        Assert.True(TestData.MaxAbsDiff(BatLayer.Restored(merged, d, g), w) < 1e-5);
    }

    // ------------------------------------------------------------------ Bone mini

    [Fact]
    public void Bone_mini_forward_equals_the_tiled_block_formula()
    {
        using var gen = new Generator(12);
        const int outF = 12, inF = 10, r = 4, miniR = 3;   // 10 % 4 ≠ 0: padded; 12 / 3 = 4 tiles
        using var linear = new Linear(Tensor.Randn([outF, inF], gen), null);
        using var layer = new BoneLayer(linear, r, miniR);
        Assert.Equal(new long[] { r, miniR }, layer.D.Shape);
        var d = new float[r * miniR];
        for (var i = 0; i < d.Length; i++) d[i] = (float)Math.Cos(i + 1);
        using (global::FineTune.Worker.Torch.Torch.NoGrad()) layer.D.Copy_(Tensor.From(d, r, miniR));
        linear.Adapter = layer;

        using var scope = DisposeScope.Begin();
        var x = Tensor.Randn([2, 3, inF], gen);
        var w = linear.Weight.ToArray<float>();
        var reference = new float[outF * inF];
        for (var o = 0; o < outF; o++)
            for (var i = 0; i < inF; i++)
                reference[o * inF + i] = w[o * inF + i] + d[(i % r) * miniR + o % miniR];
        Assert.True(TestData.MaxAbsDiff(linear.Forward(x), F.Linear(x, Tensor.From(reference, outF, inF))) < 1e-5);
        var delta = layer.DeltaWeight().ToArray<float>();
        for (var k = 0; k < delta.Length; k++) Assert.True(Math.Abs(reference[k] - w[k] - delta[k]) < 1e-6, $"ΔW[{k}]");
    }

    /// <summary>Bone's fused path is LoRA's node with A = the one-hot chunk sum and B = Dᵀ: its output and the gradients
    /// of D and x equal the composed chunk-sum form, also for an input size r does not divide (10 % 4: padded).</summary>
    [Fact]
    public void Bone_as_the_fused_lora_node_equals_the_chunk_sum_form()
    {
        using var gen = new Generator(13);
        var dev = TestData.Device;
        const int outF = 12, inF = 10, r = 4;
        using var linear = new Linear(Tensor.Randn([outF, inF], gen).To(dev), null);
        using var layer = new BoneLayer(linear, r);
        using (global::FineTune.Worker.Torch.Torch.NoGrad()) layer.D.Copy_(Tensor.Randn([r, outF], gen).To(dev));
        using var scope = DisposeScope.Begin();
        var x0 = Tensor.Randn([2, 3, inF], gen).To(dev);
        var upstream = Tensor.Randn([2, 3, outF], gen).To(dev);
        (Tensor Y, Tensor Gd, Tensor Gx) Run(bool fused)
        {
            var x = x0.Clone().RequiresGrad_();
            var y = fused
                ? AdapterOps.LoraLinear(x, linear.Weight, null, BoneLayer.LoraA(r, inF).To(dev), layer.D.T(), 1.0)
                : layer.Forward(x, F.Linear(x, linear.Weight));
            (y * upstream).Sum().Backward();
            var gd = layer.D.Grad!.Clone();
            using (global::FineTune.Worker.Torch.Torch.NoGrad()) layer.D.Grad!.Zero_();
            return (y.Detach(), gd, x.Grad!);
        }
        var (ey, egd, egx) = Run(fused: false);
        var (fy, fgd, fgx) = Run(fused: true);
        Assert.True(TestData.MaxAbsDiff(fy, ey) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(fgd, egd) < 1e-4);
        Assert.True(TestData.MaxAbsDiff(fgx, egx) < 1e-5);
    }

    // ------------------------------------------------------------------ artifacts

    public static TheoryData<string> Exported => new() { "bone-mini", "bat-col", "bat-row", "sbora-fa", "sbora-fb" };

    /// <summary>The lora/ export, loaded as a plain LoRA on a fresh model: exact forms reproduce the adapter's logits to
    /// 1e-5; Bat's SVD form records per-module errors that match the files.</summary>
    [Theory, MemberData(nameof(Exported))]
    public void Lora_export_reproduces_the_adapter_or_reports_its_error(string name)
    {
        var dir = TestData.TempDir("export");
        var spec = MethodTests.Spec(name);
        using var scope = DisposeScope.Begin();
        Tensor expected;
        JsonObject info;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        {
            TestData.Randomize(method, 5, scale: 0.02);
            expected = model.Forward(Input()).Detach();
            var files = method.Save(dir, "tiny");
            Assert.Contains("lora/adapter_model.safetensors", files);
            info = method.ExportInfo!;
            var lora = Safetensors.Load(Path.Combine(dir, "lora", "adapter_model.safetensors"));
            var rank = (long)info["r"]!;
            foreach (var (path, _) in method.Layers)
            {
                var a = lora[$"base_model.model.{path}.lora_A.weight"];
                var b = lora[$"base_model.model.{path}.lora_B.weight"];
                Assert.Equal(rank, a.Size(0));
                var truth = method.DeltaWeight(path);
                var error = (truth - b.MatMul(a)).Norm().ItemDouble() / truth.Norm().ItemDouble();
                if (name.StartsWith("bat"))
                {
                    var reported = (double)info["relative_error"]![path]!;
                    Assert.Equal(error, reported, 4);
                    Assert.InRange(reported, 1e-3, 1.0);   // a truncation of a full-rank ΔW, and better than nothing
                }
                else Assert.True(error < 1e-6, $"{path}: {error}");
            }
        }
        var exact = !name.StartsWith("bat");
        Assert.Equal(exact, (bool)info["exact"]!);
        if (!exact) Assert.True((double)info["max_relative_error"]! >= (double)info["mean_relative_error"]!);
        var r = (int)(long)info["r"]!;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(new LoraMethod { R = r, Alpha = r, TargetModules = spec.TargetModules }, model, seed: 1))
        {
            method.Load(Path.Combine(dir, "lora"));
            var diff = TestData.MaxAbsDiff(model.Forward(Input()), expected);
            if (exact) Assert.True(diff < 1e-5, $"export differs by {diff}");
        }
    }

    [Fact]
    public void Bone_mini_saves_peft_mini_config()
    {
        var dir = TestData.TempDir("mini-files");
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(MethodTests.Spec("bone-mini"), model, seed: 7);
        method.Save(dir, "tiny");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
        Assert.Equal("MISS", (string?)config["peft_type"]);
        Assert.Equal("mini", (string?)config["init_weights"]);
        Assert.Equal(8, (int)config["mini_r"]!);
        Assert.Equal(24, (int)config["r"]!);
        using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        Assert.Equal(new long[] { 24, 8 }, file.Entries["base_model.model.model.layers.0.mlp.up_proj.miss_block"].Shape);
    }

    [Fact]
    public void Bat_col_saves_peft_bat_and_row_saves_our_form()
    {
        var dir = TestData.TempDir("bat-files");
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(MethodTests.Spec("bat-col"), model, seed: 7))
        {
            method.Save(dir, "tiny");
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
            Assert.Equal("MISS", (string?)config["peft_type"]);
            Assert.Equal("bat", (string?)config["init_weights"]);
            Assert.Equal(16, (int)config["r"]!);
            using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
            Assert.Equal(new long[] { 11, 16, 16 }, file.Entries["base_model.model.model.layers.0.mlp.up_proj.miss_block"].Shape);
            Assert.Equal(new long[] { 4, 16, 16 }, file.Entries["base_model.model.model.layers.1.mlp.down_proj.miss_block"].Shape);
            Assert.Equal(new long[] { 2, 16, 16 }, file.Entries["base_model.model.model.layers.1.self_attn.k_proj.miss_block"].Shape);
        }
        var rowDir = TestData.TempDir("bat-row-files");
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(MethodTests.Spec("bat-row"), model, seed: 7))
        {
            method.Save(rowDir, "tiny");
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(rowDir, "adapter_config.json")))!;
            Assert.Equal("BAT", (string?)config["peft_type"]);
            Assert.Equal("row", (string?)config["grouping"]);
            using var file = SafetensorsFile.Open(Path.Combine(rowDir, "adapter_model.safetensors"));
            Assert.Equal(new long[] { 22, 8, 8 }, file.Entries["base_model.model.model.layers.1.mlp.down_proj.bat_block"].Shape);
            Assert.Equal(new long[] { 8, 8, 8 }, file.Entries["base_model.model.model.layers.0.mlp.up_proj.bat_block"].Shape);
            Assert.DoesNotContain(file.Entries.Keys, k => k.EndsWith("miss_block", StringComparison.Ordinal));
        }
    }

    [Fact]
    public void Sbora_saves_indices_as_int64_tensors_and_in_its_config()
    {
        var dir = TestData.TempDir("sbora-files");
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(MethodTests.Spec("sbora-fb"), model, seed: 7);
        method.Save(dir, "tiny");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
        Assert.Equal("SBORA", (string?)config["peft_type"]);
        Assert.Equal("fb", (string?)config["variant"]);
        Assert.Equal(16.0, (double)config["lora_alpha"]!);
        const string path = "model.layers.1.self_attn.k_proj";
        var layer = (SboraLayer)method.Layers[path];
        var idx = layer.Index.ToArray<long>();
        Assert.Equal(idx, config["indices"]![path]!.AsArray().Select(n => (long)n!));
        using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        var entry = file.Entries[$"base_model.model.{path}.sbora_idx"];
        Assert.Equal("I64", entry.DType);
        Assert.Equal(new long[] { 8 }, entry.Shape);
        Assert.Equal(idx, file.Read(entry.Name).ToArray<long>());
        Assert.Equal(new long[] { 8, 64 }, file.Entries[$"base_model.model.{path}.sbora_A.weight"].Shape);
    }

    // ------------------------------------------------------------------ SBoRA indices

    private static Dictionary<string, long[]> Indices(IAdapterMethod method) =>
        method.Layers.ToDictionary(kv => kv.Key, kv => ((SboraLayer)kv.Value).Index.ToArray<long>());

    [Theory, InlineData("sbora-fa"), InlineData("sbora-fb")]
    public void Sbora_indices_come_from_the_seed(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var spec = MethodTests.Spec(name);
        Dictionary<string, long[]> a, b, c;
        using (var m = AdapterMethods.Attach(spec, model, seed: 7)) a = Indices(m);
        using (var m = AdapterMethods.Attach(spec, model, seed: 7)) b = Indices(m);
        using (var m = AdapterMethods.Attach(spec, model, seed: 8)) c = Indices(m);
        Assert.All(a, kv => Assert.Equal(kv.Value, b[kv.Key]));
        Assert.Contains(a, kv => !kv.Value.SequenceEqual(c[kv.Key]));
        var fa = name == "sbora-fa";
        foreach (var (path, idx) in a)
        {
            var linear = model.LinearAt(path);
            Assert.Equal(8, idx.Length);
            Assert.Equal(idx.Order(), idx);                        // sorted
            Assert.Equal(idx.Length, idx.Distinct().Count());      // distinct
            Assert.All(idx, i => Assert.InRange(i, 0, (fa ? linear.InFeatures : linear.OutFeatures) - 1));
        }
        Assert.True(a.Values.Select(v => string.Join(",", v)).Distinct().Count() > 1, "every module drew the same indices");
    }

    [Fact]
    public void Sbora_only_changes_the_chosen_columns_or_rows()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        foreach (var name in new[] { "sbora-fa", "sbora-fb" })
        {
            using var method = AdapterMethods.Attach(MethodTests.Spec(name), model, seed: 3);
            TestData.Randomize(method, 9);
            const string path = "model.layers.0.mlp.up_proj";
            var idx = ((SboraLayer)method.Layers[path]).Index.ToArray<long>();
            var delta = method.DeltaWeight(path);
            var dim = name == "sbora-fa" ? 1 : 0;
            var mask = new bool[delta.Size(dim)];
            foreach (var i in idx) mask[i] = true;
            for (var k = 0; k < mask.Length; k++)
            {
                var line = delta.Select(dim, k).Abs().Sum().ItemDouble();
                Assert.True(mask[k] ? line > 0 : line == 0, $"{name}: line {k}");
            }
        }
    }

    [Fact]
    public void Sbora_indices_are_restored_from_a_checkpoint_and_checked_on_load()
    {
        var hyper = new Hyperparameters { BatchSize = 2, MaxSteps = 4 };
        var spec = MethodTests.Spec("sbora-fa");
        var dir = TestData.TempDir("sbora-ckpt");
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        string path;
        Dictionary<string, long[]> saved;
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        using (var optimizer = new AdamW(method.ParamGroups(hyper)))
        {
            TestData.Randomize(method, 2);
            saved = Indices(method);
            path = Checkpoint.Write(dir, new LoopState(2, new DataPosition(0, 4), 10, 0, 0), method, optimizer, 7, hyper, 24);
        }
        using (var method = AdapterMethods.Attach(spec, model, seed: 1234))
        using (var optimizer = new AdamW(method.ParamGroups(hyper)))
        {
            Assert.Contains(Indices(method), kv => !kv.Value.SequenceEqual(saved[kv.Key]));
            var state = Checkpoint.Restore(path, method, optimizer, hyper, 24);
            Assert.Equal(2, state.Step);
            Assert.All(Indices(method), kv => Assert.Equal(saved[kv.Key], kv.Value));
        }

        // A file whose indices repeat is refused with the module named.
        var tensors = Safetensors.Load(path);
        var key = "adapter.base_model.model.model.layers.0.self_attn.q_proj.sbora_idx";
        tensors[key] = Tensor.From(new long[] { 0, 0, 1, 2, 3, 4, 5, 6 });
        var bad = Path.Combine(dir, "bad.safetensors");
        Safetensors.Save(bad, tensors, Safetensors.ReadMetadata(path));
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        using (var optimizer = new AdamW(method.ParamGroups(hyper)))
        {
            var e = Assert.Throws<InvalidDataException>(() => Checkpoint.Restore(bad, method, optimizer, hyper, 24));
            Assert.Contains("model.layers.0.self_attn.q_proj.sbora_idx", e.Message);
        }
    }

    // ------------------------------------------------------------------ options and counts

    [Fact]
    public void Parameter_counts_on_llama2_7b_shapes()
    {
        var llama2 = new ModelConfig { VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32 };
        long Total(MethodSpec m) => llama2.NumHiddenLayers * llama2.LayerLinears().Sum(m.TrainableParameters);
        Assert.Equal(64L * (4 * 4096 + 2 * 11008 + 4096) * 32, Total(new BatMethod { R = 64, TargetModules = All }));   // out·r, as bone
        Assert.Equal(64L * (6 * 4096 + 11008) * 32, Total(new BatMethod { R = 64, Grouping = "row", TargetModules = All }));  // in·r
        Assert.Equal(64L * 128 * 7 * 32, Total(new BoneMethod { R = 64, Mode = "mini", MiniR = 128, TargetModules = All }));
        Assert.Equal(32L * (4 * 4096 + 2 * 11008 + 4096) * 32, Total(new SboraMethod { R = 32, TargetModules = All }));
        Assert.Equal(32L * (6 * 4096 + 11008) * 32, Total(new SboraMethod { Variant = "fb", R = 32, TargetModules = All }));
        Assert.Empty(new BatMethod { R = 64, TargetModules = All }.ValidateShapes(llama2.LayerLinears()));
        // 11008 = 2^8 · 43: r = 512 divides 4096 but not 11008.
        var e = Assert.Single(new BatMethod { R = 512, TargetModules = ["down_proj"] }.ValidateShapes(llama2.LayerLinears()));
        Assert.Equal("method.r", e.Field);
        Assert.Contains("down_proj with shape (4096, 11008)", e.Error);
    }

    [Fact]
    public void Option_errors_name_their_fields()
    {
        Assert.Contains(new BoneMethod { Mode = "maxi" }.Validate(), e => e.Field == "method.mode");
        Assert.Contains(new BoneMethod { MiniR = 4 }.Validate(), e => e.Field == "method.miniR" && e.Error.Contains("mode 'mini'"));
        Assert.Contains(new BoneMethod { Mode = "mini", MiniR = 0 }.Validate(), e => e.Field == "method.miniR");
        Assert.Contains(new BatMethod { Grouping = "diag" }.Validate(), e => e.Field == "method.grouping");
        Assert.Contains(new SboraMethod { Variant = "fc" }.Validate(), e => e.Field == "method.variant");
        Assert.Contains(new SboraMethod { Alpha = 0 }.Validate(), e => e.Field == "method.alpha");
        var tiny = TinyModel.DefaultConfig.LayerLinears();
        Assert.Contains(new BoneMethod { R = 8, Mode = "mini", MiniR = 24 }.ValidateShapes(tiny),
            e => e.Field == "method.miniR" && e.Error.Contains("q_proj with shape (64, 64)"));
        Assert.Contains(new SboraMethod { Variant = "fb", R = 48, TargetModules = ["k_proj"] }.ValidateShapes(tiny),
            e => e.Field == "method.r" && e.Error.Contains("k_proj with shape (32, 64)"));
        Assert.Empty(new SboraMethod { Variant = "fa", R = 48, TargetModules = ["k_proj"] }.ValidateShapes(tiny));
    }
}
