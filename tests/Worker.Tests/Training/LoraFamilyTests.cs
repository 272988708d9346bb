using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Methods.Dora;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>LoRA's inits (gaussian, PiSSA, OLoRA), LoRA+, DoRA: the math against PEFT's formulas, files and exports.</summary>
[Collection(GlobalGeneratorCollection.Name)]
public sealed class LoraFamilyTests
{
    private static readonly string[] All = MethodSpec.AllModules;
    private const string Q1 = "model.layers.1.self_attn.q_proj";

    private static Tensor Input() => MethodTests.Input();

    [Fact]
    public void Parameter_counts_follow_the_formulas_on_llama2_7b_shapes()
    {
        var llama2 = new ModelConfig { VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32 };
        long Count(MethodSpec m) => llama2.NumHiddenLayers * llama2.LayerLinears().Where(s => m.TargetModules.Contains(s.Name)).Sum(m.TrainableParameters);
        // PEFT prints 4,194,304 trainable parameters for Llama-2-7B, r=8 on q,v; DoRA adds one magnitude per output row.
        Assert.Equal(4_194_304, Count(new LoraMethod { R = 8, TargetModules = ["q_proj", "v_proj"] }));
        Assert.Equal(4_194_304 + 2 * 4096 * 32, Count(new DoraMethod { R = 8, TargetModules = ["q_proj", "v_proj"] }));
        Assert.Equal(Count(new LoraMethod { R = 8, TargetModules = All }), Count(new LoraMethod { R = 8, Init = "pissa", TargetModules = All }));
        Assert.Equal(8L * (4 * 4096 + 2 * 11008 + 4096 + 4 * 4096 + 2 * 4096 + 11008) * 32 + (4 * 4096 + 2 * 11008 + 4096) * 32L,
            Count(new DoraMethod { R = 8, TargetModules = All }));
    }

    [Fact]
    public void Gaussian_init_draws_a_with_std_one_over_r_and_b_zero()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new LoraMethod { R = 4, Init = "gaussian", TargetModules = ["gate_proj", "up_proj"] }, model, 3);
        var a = method.Layers.Values.SelectMany(l => ((LoraLayer)l).A.ToArray<float>()).ToArray();
        var mean = a.Average();
        var std = Math.Sqrt(a.Select(v => (v - mean) * (v - mean)).Average());
        Assert.InRange(std, 0.25 * 0.9, 0.25 * 1.1);   // 4 layers x (4 x 64) draws of N(0, 1/4²)
        Assert.InRange(Math.Abs(mean), 0, 0.03);
        Assert.All(method.Layers.Values, l => Assert.All(((LoraLayer)l).B.ToArray<float>(), v => Assert.Equal(0f, v)));
    }

    [Fact]
    public void Pissa_follows_peft_pissa_init_and_moves_the_top_r_part_out_of_w()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        var w = model.LinearAt(Q1).Weight.Clone();
        var spec = new LoraMethod { R = 4, Alpha = 8, Init = "pissa", TargetModules = ["q_proj"] };
        using var method = AdapterMethods.Attach(spec, model, seed: 1);
        var layer = (LoraLayer)method.Layers[Q1];
        var s = spec.Scaling;

        // PEFT: V, S, Uh = svd(W); Sr = S[:r] / s; A = diag(√Sr)·Uh[:r]; B = V[:, :r]·diag(√Sr); W ← W − s·B·A.
        var (u, sv, vh) = Linalg.Svd(w);
        var root = (sv.Narrow(0, 0, 4) / s).Sqrt();
        Assert.True(TestData.MaxAbsDiff(layer.A, root.Unsqueeze(1) * vh.Narrow(0, 0, 4)) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.B, u.Narrow(1, 0, 4) * root.Unsqueeze(0)) < 1e-5);
        var top = u.Narrow(1, 0, 4).MatMul(sv.Narrow(0, 0, 4).Unsqueeze(1) * vh.Narrow(0, 0, 4));
        Assert.True(TestData.MaxAbsDiff(layer.DeltaWeight(), top) < 1e-6);             // s·B·A = U_r S_r V_rᵀ
        Assert.True(TestData.MaxAbsDiff(model.LinearAt(Q1).Weight, w - top) < 1e-6);   // W_res replaced W
        Assert.True(TestData.MaxAbsDiff(model.LinearAt(Q1).Weight, w) > 1e-3);
        // The residual's singular values are W's from the r-th on.
        var (_, resS, _) = Linalg.Svd(model.LinearAt(Q1).Weight);
        Assert.True(TestData.MaxAbsDiff(resS.Narrow(0, 0, 60), sv.Narrow(0, 4, 60)) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.InitialA!, layer.A) == 0 && TestData.MaxAbsDiff(layer.InitialB!, layer.B) == 0);
    }

    [Fact]
    public void Olora_follows_peft_olora_init()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        const string down = "model.layers.0.mlp.down_proj";   // (64, 176): Q (64, 64), R (64, 176)
        var w = model.LinearAt(down).Weight.Clone();
        var spec = new LoraMethod { R = 8, Alpha = 16, Init = "olora", TargetModules = ["down_proj"] };
        using var method = AdapterMethods.Attach(spec, model, seed: 1);
        var layer = (LoraLayer)method.Layers[down];
        // PEFT: Q, R = qr(W); A = R[:r]; B = Q[:, :r] (no scaling); W ← W − s·B·A.
        var (q, r) = Linalg.Qr(w);
        Assert.True(TestData.MaxAbsDiff(layer.A, r.Narrow(0, 0, 8)) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.B, q.Narrow(1, 0, 8)) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.B.T().MatMul(layer.B), EyeOf(8)) < 1e-5);   // orthonormal columns
        Assert.True(TestData.MaxAbsDiff(model.LinearAt(down).Weight, w - layer.B.MatMul(layer.A) * spec.Scaling) < 1e-6);
    }

    private static Tensor EyeOf(int n)
    {
        var a = new float[n * n];
        for (var i = 0; i < n; i++) a[i * n + i] = 1;
        return Tensor.From(a, n, n);
    }

    [Fact]
    public void Dora_forward_equals_the_weight_decomposed_reference_with_bias()
    {
        using var gen = new Generator(5);
        const int outF = 6, inF = 10, r = 3;
        const double scaling = 0.7;
        using var linear = new Linear(Tensor.Randn([outF, inF], gen), Tensor.Randn([outF], gen));
        using var layer = new DoraLayer(linear, r, scaling, 0.0, gen, "default");
        using var scope = DisposeScope.Begin();
        var w = linear.Weight.Clone();
        // m = ‖W‖ per output row at init.
        Assert.True(TestData.MaxAbsDiff(layer.Magnitude, w.Norm(2, [1])) < 1e-6);
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
        {
            layer.B.Copy_(Tensor.Randn([outF, r], gen) * 0.3);
            layer.Magnitude.Copy_(layer.Magnitude * (Tensor.Rand([outF], gen) + 0.5));
        }
        linear.Adapter = layer;
        var x = Tensor.Randn([2, 5, inF], gen);
        // W' = m · (W + s·B·A) / ‖W + s·B·A‖_row; y = x W'ᵀ + b.
        var v = w + layer.B.MatMul(layer.A) * scaling;
        var wPrime = (layer.Magnitude / v.Norm(2, [1])).Unsqueeze(1) * v;
        var expected = F.Linear(x, wPrime.Detach(), linear.Bias);
        Assert.True(TestData.MaxAbsDiff(linear.Forward(x), expected) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.DeltaWeight(), wPrime.Detach() - w) < 1e-6);

        // The norm is detached: the magnitude's gradient is ∂/∂m of Σ y with the norm held constant.
        linear.Forward(x).Sum().Backward();
        var xSum = x.Reshape(-1, inF).Sum([0]);
        var gradM = (v.Detach().MatMul(xSum.Unsqueeze(1)).Squeeze(1)) / v.Detach().Norm(2, [1]);
        Assert.True(TestData.MaxAbsDiff(layer.Magnitude.Grad!, gradM) < 1e-4);
    }

    /// <summary>adapterDtype fp32 over a bf16 base (the composed path: the CPU, or no exact node): PEFT's arithmetic, the
    /// adapter in fp32 on x cast to fp32 and the sum rounded once to bf16 (LoRA: base + s·(x Aᵀ) Bᵀ; DoRA: base + (f − 1)·
    /// (base − b) + f·s·(x Aᵀ) Bᵀ), against the layer, which sums in place into the base output (and, for DoRA without
    /// dropout, computes f·(x Wᵀ + s·(x Aᵀ) Bᵀ) + b). The output to bf16 rounding, the fp32 gradients to 1e-4.</summary>
    [Theory]
    [InlineData("lora", false), InlineData("lora", true), InlineData("dora", false), InlineData("dora", true)]
    public void Fp32_adapter_math_over_a_bf16_base_is_PEFTs_formula(string method, bool withBias)
    {
        const int outF = 24, inF = 40, r = 4;
        const double scaling = 1.75;   // not a power of two
        using var gen = new Generator(31);
        using var linear = new Linear(Tensor.Randn([outF, inF], gen).To(ScalarType.BFloat16),
            withBias ? Tensor.Randn([outF], gen).To(ScalarType.BFloat16) : null);
        IAdapterLayer layer = method == "lora"
            ? new LoraLayer(linear, r, scaling, 0.0, gen, "default")
            : new DoraLayer(linear, r, scaling, 0.0, gen, "default");
        using var disposeLayer = layer;
        using var scope = DisposeScope.Begin();
        var (a, b) = layer is LoraLayer l ? (l.A, l.B) : (((DoraLayer)layer).A, ((DoraLayer)layer).B);
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
        {
            b.Copy_(Tensor.Randn([outF, r], gen) * 0.5);
            if (layer is DoraLayer d0) d0.Magnitude.Copy_(d0.Magnitude * (Tensor.Rand([outF], gen) + 0.5));
        }
        linear.Adapter = layer;
        var x = Tensor.Randn([2, 6, inF], gen).To(ScalarType.BFloat16);
        var gy = Tensor.Randn([2, 6, outF], gen).To(ScalarType.BFloat16);

        var y = linear.Forward(x);
        (y.To(ScalarType.Float32) * gy.To(ScalarType.Float32)).Sum().Backward();
        var (ga, gb) = (a.Grad!.Clone(), b.Grad!.Clone());
        var gm = layer is DoraLayer dm ? dm.Magnitude.Grad!.Clone() : null;

        var a2 = a.Detach().Clone().RequiresGrad_();
        var b2 = b.Detach().Clone().RequiresGrad_();
        var baseOut = F.Linear(x, linear.Weight, linear.Bias);
        var u = F.Linear(F.Linear(x.To(ScalarType.Float32), a2), b2) * scaling;
        Tensor reference;
        Tensor? m2 = null;
        if (layer is DoraLayer dl)
        {
            m2 = dl.Magnitude.Detach().Clone().RequiresGrad_();
            var f = m2 / dl.WeightNorm();
            var wx = (withBias ? baseOut - linear.Bias! : baseOut).To(ScalarType.Float32);
            reference = (baseOut + (f - 1) * wx + f * u).To(ScalarType.BFloat16);
        }
        else reference = (baseOut.To(ScalarType.Float32) + u).To(ScalarType.BFloat16);
        (reference.To(ScalarType.Float32) * gy.To(ScalarType.Float32)).Sum().Backward();

        Assert.Equal(ScalarType.BFloat16, y.DType);
        Assert.True(MaxRelativeTo(y, reference) < 1e-2, $"output differs by {MaxRelativeTo(y, reference)}");
        Assert.True(MaxRelativeTo(ga, a2.Grad!) < 1e-4, $"grad A differs by {MaxRelativeTo(ga, a2.Grad!)}");
        Assert.True(MaxRelativeTo(gb, b2.Grad!) < 1e-4, $"grad B differs by {MaxRelativeTo(gb, b2.Grad!)}");
        if (gm is not null) Assert.True(MaxRelativeTo(gm, m2!.Grad!) < 1e-3, $"grad m differs by {MaxRelativeTo(gm, m2!.Grad!)}");
    }

    /// <summary>max |a − b| over max |b| (fp32).</summary>
    private static double MaxRelativeTo(Tensor a, Tensor b)
    {
        using var scope = DisposeScope.Begin();
        var b32 = b.To(ScalarType.Float32);
        return (a.To(ScalarType.Float32) - b32).Abs().Max().ItemDouble() / b32.Abs().Max().ItemDouble();
    }

    /// <summary>‖W + s·B·A‖ per row, materialised in fp32: the reference the factored norm must reproduce.</summary>
    private static Tensor MaterialisedNorm(DoraLayer layer) =>
        (layer.Base.Weight.To(ScalarType.Float32) + layer.B.MatMul(layer.A) * layer.Scaling).Norm(2, [1]);

    private static double MaxRelativeDiff(Tensor actual, Tensor expected) =>
        ((actual - expected).Abs() / expected.Abs()).Max().ItemDouble();

    [Theory]
    [InlineData(6, 10, 3, 0.7)]
    [InlineData(64, 16, 8, 2.0)]
    [InlineData(16, 96, 4, 0.25)]
    [InlineData(48, 48, 16, 1.0)]
    public void Dora_factored_norm_equals_the_materialised_one(int outF, int inF, int r, double scaling)
    {
        using var gen = new Generator(outF * 1000 + inF);
        using var linear = new Linear(Tensor.Randn([outF, inF], gen), null);
        using var layer = new DoraLayer(linear, r, scaling, 0.0, gen, "default");
        using var scope = DisposeScope.Begin();
        // B = 0 at init: f = m / norm is exactly 1, so the first step is the base model's.
        Assert.Equal(0f, TestData.MaxAbsDiff(layer.Magnitude / layer.WeightNorm(), Tensor.Ones([outF])));
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
        {
            // s·B·A of the size of W, so the cross and quadratic terms matter: A's rows have norm ~0.6, B's entries ~√(in)/r.
            layer.B.Copy_(Tensor.Randn([outF, r], gen) * (Math.Sqrt(inF) / (r * scaling)));
            layer.A.Copy_(Tensor.Randn([r, inF], gen) * (1.0 / Math.Sqrt(inF)));
        }
        var expected = MaterialisedNorm(layer);
        Assert.InRange(MaxRelativeDiff(layer.WeightNorm(), expected), 0, 1e-5);
        Assert.True(MaxRelativeDiff(linear.Weight.Norm(2, [1]), expected) > 0.05);   // the low-rank terms are not negligible
        Assert.False(layer.WeightNorm().RequiresGrad);
    }

    /// <summary>A bf16 base (as on the GPU): W·Aᵀ runs in bf16 (A rounded to bf16, the product too), ‖W‖² in fp32. The
    /// reference is the same bf16 W cast to fp32 plus s·B·A in fp32 (PEFT's, which promotes W + s·B·A to fp32). Measured
    /// here: 1.7e-5 at ‖s·B·A‖ ≈ 0.07·‖W‖, 6e-5 at 0.3 (this case), 2e-4 at 0.85 on a 96 × 256 module: far below the
    /// bf16 rounding (4e-3) of the base output the norm's f multiplies.</summary>
    [Fact]
    public void Dora_factored_norm_of_a_bf16_base_stays_within_1e_4_of_the_fp32_reference()
    {
        const int outF = 256, inF = 1024, r = 16;
        const double scaling = 2.0;
        using var gen = new Generator(11);
        using var linear = new Linear(Tensor.Randn([outF, inF], gen).To(ScalarType.BFloat16), null);
        using var layer = new DoraLayer(linear, r, scaling, 0.0, gen, "default");
        using var scope = DisposeScope.Begin();
        Assert.Equal(ScalarType.Float32, layer.WeightNorm().DType);
        Assert.Equal(0f, TestData.MaxAbsDiff(layer.Magnitude / layer.WeightNorm(), Tensor.Ones([outF])));
        Assert.InRange(MaxRelativeDiff(layer.Magnitude, MaterialisedNorm(layer)), 0, 1e-6);   // ‖W‖ of the bf16 values, in fp32
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
            layer.B.Copy_(Tensor.Randn([outF, r], gen) * 2.0);      // ‖s·B·A‖_row ≈ 0.3·‖W‖_row
        var expected = MaterialisedNorm(layer);
        Assert.True(MaxRelativeDiff(linear.Weight.To(ScalarType.Float32).Norm(2, [1]), expected) > 0.02);
        Assert.InRange(MaxRelativeDiff(layer.WeightNorm(), expected), 0, 1e-4);
    }

    /// <summary>The merge and unmerge write W, then set Merged: the cached ‖W‖² must follow the new W.</summary>
    [Fact]
    public void Dora_norm_follows_the_base_weight_after_a_merge_flag_change()
    {
        using var gen = new Generator(3);
        using var linear = new Linear(Tensor.Randn([12, 20], gen), null);
        using var layer = new DoraLayer(linear, 4, 1.0, 0.0, gen, "default");
        using var scope = DisposeScope.Begin();
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
        {
            layer.B.Copy_(Tensor.Randn([12, 4], gen) * 0.3);
            linear.Weight.Copy_(linear.Weight * 1.5 + 0.1);
        }
        layer.Merged = true;
        layer.Merged = false;
        Assert.InRange(MaxRelativeDiff(layer.WeightNorm(), MaterialisedNorm(layer)), 0, 1e-5);
    }

    [Fact]
    public void Dora_with_dropout_in_training_differs_from_eval_and_eval_matches_the_reference()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(new DoraMethod { R = 4, Dropout = 0.3, TargetModules = ["q_proj"] }, model, seed: 7);
        TestData.Randomize(method, 8);
        using var scope = DisposeScope.Begin();
        var trained = model.Forward(Input());
        method.Train(false);
        var eval = model.Forward(Input());
        method.Merge();
        Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), eval) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(trained, eval) > 1e-4);
    }

    [Fact]
    public void Lora_plus_puts_b_in_its_own_group_with_the_ratio()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var hyper = new Hyperparameters { LearningRate = 1e-4, WeightDecay = 0.01 };
        using (var plain = AdapterMethods.Attach(new LoraMethod { R = 4, TargetModules = ["q_proj"] }, model, 1))
            Assert.Equal(4, Assert.Single(plain.ParamGroups(hyper)).Parameters.Count);
        using (var lora = AdapterMethods.Attach(new LoraMethod { R = 4, LoraPlusRatio = 16, TargetModules = ["q_proj", "v_proj"] }, model, 1))
        {
            var groups = lora.ParamGroups(hyper);
            Assert.Equal(["lora_A", "lora_B"], groups.Select(g => g.Name));
            Assert.Equal(1e-4, groups[0].LearningRate, 12);
            Assert.Equal(1.6e-3, groups[1].LearningRate, 12);
            Assert.All(groups, g => Assert.Equal(0.01, g.WeightDecay));
            var bs = lora.Layers.Values.Select(l => ((LoraLayer)l).B).ToList();
            Assert.Equal(4, groups[1].Parameters.Count);
            Assert.All(groups[1].Parameters, p => Assert.Contains(bs, b => ReferenceEquals(b, p)));
            Assert.Equal(4, groups[0].Parameters.Count);
            // The optimizer takes both groups; the schedule scales each one's own rate.
            using var adam = new FineTune.Worker.Torch.Optim.AdamW(groups);
            Assert.Equal(2, adam.Groups.Count);
        }
        using (var dora = AdapterMethods.Attach(new DoraMethod { R = 4, LoraPlusRatio = 4, TargetModules = ["q_proj"] }, model, 1))
        {
            var groups = dora.ParamGroups(hyper);
            Assert.Equal(2 * 2, groups[0].Parameters.Count);   // A and the magnitude of 2 layers keep lr
            Assert.Equal(2, groups[1].Parameters.Count);
            Assert.Equal(4e-4, groups[1].LearningRate, 12);
        }
    }

    [Fact]
    public void Pissa_and_dora_files_follow_peft()
    {
        var dir = TestData.TempDir("pissa-files");
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(new LoraMethod { R = 4, Init = "pissa", TargetModules = ["q_proj"] }, model, 1))
            method.Save(dir, "tiny");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
        Assert.Equal("pissa", (string?)config["init_lora_weights"]);
        Assert.False((bool)config["use_dora"]!);

        var doraDir = TestData.TempDir("dora-files");
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(new DoraMethod { R = 4, Alpha = 8, Init = "gaussian", TargetModules = ["q_proj", "v_proj"] }, model, 1))
        {
            var files = method.Save(doraDir, "tiny");
            Assert.Contains("lora/adapter_model.safetensors", files);
        }
        var dora = JsonNode.Parse(File.ReadAllText(Path.Combine(doraDir, "adapter_config.json")))!;
        Assert.Equal("LORA", (string?)dora["peft_type"]);
        Assert.True((bool)dora["use_dora"]!);
        Assert.Equal("gaussian", (string?)dora["init_lora_weights"]);
        Assert.Equal(8.0, (double)dora["lora_alpha"]!);
        using var file = SafetensorsFile.Open(Path.Combine(doraDir, "adapter_model.safetensors"));
        Assert.Equal(2 * 2 * 3, file.Entries.Count);
        Assert.Equal(new long[] { 32 }, file.Entries["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"].Shape);
        Assert.Equal(new long[] { 4, 64 }, file.Entries["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].Shape);
        Assert.DoesNotContain(file.Entries.Keys, k => k.EndsWith("lora_magnitude_vector.weight", StringComparison.Ordinal));
        var export = JsonNode.Parse(File.ReadAllText(Path.Combine(doraDir, "lora", "adapter_config.json")))!;
        Assert.False((bool)export["use_dora"]!);
    }

    public static TheoryData<string> ExactExports => new() { "lora", "lora-gaussian", "pissa", "olora" };

    /// <summary>Loaded as a plain LoRA onto the ORIGINAL base, the export reproduces the adapter's outputs.</summary>
    [Theory, MemberData(nameof(ExactExports))]
    public void Lora_export_on_the_original_model_reproduces_the_adapter(string name)
    {
        var dir = TestData.TempDir("export");
        var spec = (LoraMethod)MethodTests.Spec(name);
        using var scope = DisposeScope.Begin();
        Tensor expected;
        JsonObject info;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        {
            TestData.Randomize(method, 21);
            expected = model.Forward(Input()).Detach();
            method.Save(dir, "tiny");
            info = method.ExportInfo!;
        }
        var rank = spec.ChangesBaseWeights ? 2 * spec.R : spec.R;
        Assert.True((bool)info["exact"]!);
        Assert.Equal(rank, (long)info["r"]!);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "lora", "adapter_config.json")))!;
        Assert.Equal(rank, (int)config["r"]!);
        Assert.Equal((double)rank, (double)config["lora_alpha"]!);
        Assert.False((bool)config["use_rslora"]!);
        Assert.True((bool)config["init_lora_weights"]!);

        using var fresh = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var plain = AdapterMethods.Attach(new LoraMethod { R = rank, Alpha = rank, TargetModules = spec.TargetModules }, fresh, seed: 1);
        plain.Load(Path.Combine(dir, "lora"));
        Assert.True(TestData.MaxAbsDiff(fresh.Forward(Input()), expected) < 1e-5);
    }

    [Fact]
    public void Dora_export_is_the_svd_of_its_delta_exact_where_the_rank_allows()
    {
        var dir = TestData.TempDir("dora-export");
        // k_proj and v_proj are (32, 64): r = 32 = min(out, in) makes their export exact; q_proj (64, 64) is truncated.
        var spec = new DoraMethod { R = 32, Alpha = 32, TargetModules = ["q_proj", "k_proj", "v_proj"] };
        using var scope = DisposeScope.Begin();
        Tensor expected;
        JsonObject info;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        {
            TestData.Randomize(method, 22);
            using (global::FineTune.Worker.Torch.Torch.NoGrad())
                foreach (var layer in method.Layers.Values.Cast<DoraLayer>())   // magnitudes near the row norms, as after training
                    layer.Magnitude.Copy_(layer.Base.Weight.Norm(2, [1]) * (1 + layer.Magnitude));
            expected = model.Forward(Input()).Detach();
            method.Save(dir, "tiny");
            info = method.ExportInfo!;
        }
        Assert.False((bool)info["exact"]!);
        var errors = info["relative_error"]!.AsObject();
        Assert.Equal(6, errors.Count);
        foreach (var (path, e) in errors)
        {
            if (path.EndsWith("q_proj", StringComparison.Ordinal)) Assert.InRange((double)e!, 1e-3, 1.0);
            else Assert.InRange((double)e!, 0, 1e-5);
        }
        Assert.Equal((double)info["max_relative_error"]!, errors.Max(kv => (double)kv.Value!));

        // With q_proj left out, the export of k and v alone must reproduce DoRA on those modules.
        using var fresh = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var plain = AdapterMethods.Attach(new LoraMethod { R = 32, Alpha = 32, TargetModules = spec.TargetModules }, fresh, seed: 1);
        plain.Load(Path.Combine(dir, "lora"));
        var approx = fresh.Forward(Input());
        var err = TestData.MaxAbsDiff(approx, expected);
        var scale = expected.Abs().Max().ItemFloat();
        Assert.True(err < 0.2 * scale, $"export drifts {err} on logits of scale {scale}");
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec with { TargetModules = ["k_proj", "v_proj"] }, model, seed: 7))
        {
            var kv = Safetensors.Load(Path.Combine(dir, "adapter_model.safetensors"));
            method.LoadTrainable(kv.Where(t => !t.Key.Contains("q_proj")).ToDictionary());
            var doraKv = model.Forward(Input());
            using var fresh2 = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
            using var plain2 = AdapterMethods.Attach(new LoraMethod { R = 32, Alpha = 32, TargetModules = ["k_proj", "v_proj"] }, fresh2, seed: 1);
            var export = Safetensors.Load(Path.Combine(dir, "lora", "adapter_model.safetensors"));
            plain2.LoadTrainable(export.Where(t => !t.Key.Contains("q_proj")).ToDictionary());
            Assert.True(TestData.MaxAbsDiff(fresh2.Forward(Input()), doraKv) < 1e-5);
        }
    }
}
