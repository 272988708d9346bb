using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Methods.Bone;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

[Collection(GlobalGeneratorCollection.Name)]
public sealed class MethodTests
{
    private static readonly string[] All = MethodSpec.AllModules;

    public static TheoryData<string> Methods => new() { "lora", "bone", "bone-odd", "bone-mini", "bat-col", "bat-row", "sbora-fa", "sbora-fb", "vblora", "xgblora", "lora-gaussian", "pissa", "olora", "dora", "dora-gaussian" };

    /// <summary>bone-odd: r=24 does not divide 64 or 176, so every input is padded. The tiny model's modules are
    /// (64, 64), (32, 64), (176, 64) and (64, 176): Bat's r and mini's miniR must divide 16. SBoRA without dropout, so
    /// merged and unmerged forwards compare exactly.</summary>
    internal static MethodSpec Spec(string name) => name switch
    {
        "lora" => new LoraMethod { R = 4, Alpha = 8, TargetModules = All },
        "lora-gaussian" => new LoraMethod { R = 4, Alpha = 8, Init = "gaussian", LoraPlusRatio = 16, TargetModules = All },
        "pissa" => new LoraMethod { R = 4, Alpha = 8, Init = "pissa", TargetModules = All },
        "olora" => new LoraMethod { R = 6, Alpha = 4, Rslora = true, Init = "olora", TargetModules = ["q_proj", "v_proj", "down_proj"] },
        "dora" => new DoraMethod { R = 4, Alpha = 8, TargetModules = All },
        "dora-gaussian" => new DoraMethod { R = 8, Alpha = 8, Rslora = true, Init = "gaussian", TargetModules = ["q_proj", "o_proj", "up_proj"] },
        "bone" => new BoneMethod { R = 16, TargetModules = All },
        "bone-odd" => new BoneMethod { R = 24, TargetModules = ["q_proj", "o_proj", "down_proj"] },
        "bone-mini" => new BoneMethod { R = 24, Mode = "mini", MiniR = 8, TargetModules = All },
        "bat-col" => new BatMethod { R = 16, TargetModules = All },
        "bat-row" => new BatMethod { R = 8, Grouping = "row", TargetModules = All },
        "sbora-fa" => new SboraMethod { R = 8, Alpha = 16, Dropout = 0, TargetModules = All },
        "sbora-fb" => new SboraMethod { Variant = "fb", R = 8, Alpha = 16, Dropout = 0, TargetModules = All },
        // b = 16 divides every tiny module (64, 32, 176); L_s = 2 is every layer of the tiny model, so layer 1 has a booster.
        "vblora" => new VbLoraMethod { R = 4, NumVectors = 32, VectorLength = 16, TopK = 2, TargetModules = All },
        "xgblora" => new XgbLoraMethod { Rank = 2, LayersPerRound = 2, StepsPerRound = 3, L2 = 1e-3, TargetModules = All },
        _ => throw new ArgumentException(name),
    };

    internal static Tensor Input() => TestData.Ids([256, 72, 101, 108, 108, 111, 32, 119], [256, 98, 121, 116, 101, 115, 258, 258]);

    [Theory, MemberData(nameof(Methods))]
    public void Zero_init_adapter_leaves_logits_unchanged(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        var before = model.Forward(Input());
        using var method = AdapterMethods.Attach(Spec(name), model, seed: 7);
        var after = model.Forward(Input());
        if (name == "vblora")
        {
            // VB-LoRA is not a no-op at init: random logits mix a random bank into non-zero A and B.
            Assert.True(TestData.MaxAbsDiff(before, after) > 1e-7);
            return;
        }
        // PiSSA/OLoRA move s·B₀A₀ out of W into the adapter: the same function up to fp32 rounding, not bit for bit.
        if (Spec(name) is LoraMethod { ChangesBaseWeights: true }) Assert.InRange(TestData.MaxAbsDiff(before, after), 0f, 1e-5f);
        else Assert.Equal(0f, TestData.MaxAbsDiff(before, after));
        TestData.Randomize(method, 1);
        Assert.True(TestData.MaxAbsDiff(before, model.Forward(Input())) > 1e-4);
    }

    [Theory, MemberData(nameof(Methods))]
    public void Trainable_parameter_count_matches_the_formula(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var spec = Spec(name);
        using var method = AdapterMethods.Attach(spec, model, seed: 7);
        var config = model.Config;
        var perLayer = config.LayerLinears().Where(m => spec.TargetModules.Contains(m.Name)).Sum(spec.TrainableParameters);
        var expected = spec switch
        {
            VbLoraMethod v => (long)v.NumVectors * v.VectorLength + config.NumHiddenLayers * perLayer,   // h·b + Σ r·h·(in+out)/b
            XgbLoraMethod x => Math.Min(x.LayersPerRound, config.NumHiddenLayers) * perLayer,           // one round's boosters
            _ => config.NumHiddenLayers * perLayer,
        };
        Assert.Equal(expected, method.TrainableParameterCount);
        Assert.Equal(expected, spec.TotalTrainableParameters(config));
        Assert.Equal(config.NumHiddenLayers * spec.TargetModules.Length, method.Layers.Count);
        Assert.All(method.TrainableTensors, t => Assert.Matches(@"^base_model\.(model\.model\.layers\.\d+\.|vblora_vector_bank$|xgblora_booster\.)", t.Name));
    }

    [Fact]
    public void Bone_r64_on_all_linears_of_llama2_7b_has_87_0M_parameters()
    {
        var llama2 = new ModelConfig { VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32 };
        var bone = new BoneMethod { R = 64, TargetModules = All };
        var total = llama2.NumHiddenLayers * llama2.LayerLinears().Sum(bone.TrainableParameters);
        Assert.Equal(64L * (4 * 4096 + 2 * 11008 + 4096) * 32, total);
        Assert.Equal(87.0, Math.Round(total / 1e6, 1));
        Assert.Empty(bone.ValidateShapes(llama2.LayerLinears()));
    }

    [Theory, MemberData(nameof(Methods))]
    public void Only_adapter_tensors_receive_gradients(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Spec(name), model, seed: 7);
        TestData.Randomize(method, 2);
        using var scope = DisposeScope.Begin();
        var ids = Input();
        model.Loss(ids, ids).Backward();
        Assert.All(model.Parameters(), p => Assert.Null(p.Grad));
        Assert.All(method.FrozenTensors, t => Assert.Null(t.Tensor.Grad));
        Assert.All(method.TrainableTensors, t =>
        {
            var g = t.Tensor.Grad;
            Assert.NotNull(g);
            Assert.True(g!.Abs().Sum().ItemDouble() > 0, $"{t.Name} got a zero gradient");
        });
    }

    [Fact]
    public void Bone_fast_forward_equals_the_reference_delta_weight_form_with_padding()
    {
        using var gen = new Generator(11);
        const int outF = 6, inF = 10, r = 4;    // 10 % 4 ≠ 0: the input is padded by 2
        using var linear = new Linear(Tensor.Randn([outF, inF], gen), Tensor.Randn([outF], gen));
        using var layer = new BoneLayer(linear, r);
        var d = new float[r * outF];
        for (var i = 0; i < d.Length; i++) d[i] = (float)Math.Sin(i + 1);
        using (global::FineTune.Worker.Torch.Torch.NoGrad()) layer.D.Copy_(Tensor.From(d, r, outF));
        linear.Adapter = layer;

        using var scope = DisposeScope.Begin();
        var x = Tensor.Randn([3, 5, inF], gen);
        var w = linear.Weight.ToArray<float>();
        var reference = new float[outF * inF];
        for (var o = 0; o < outF; o++)
            for (var i = 0; i < inF; i++)
                reference[o * inF + i] = w[o * inF + i] + d[(i % r) * outF + o];
        var expected = F.Linear(x, Tensor.From(reference, outF, inF), linear.Bias);
        Assert.True(TestData.MaxAbsDiff(linear.Forward(x), expected) < 1e-5);

        var delta = layer.DeltaWeight().ToArray<float>();
        for (var k = 0; k < delta.Length; k++) Assert.True(Math.Abs(reference[k] - w[k] - delta[k]) < 1e-6, $"ΔW[{k}]");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Merge_matches_adapter_forward_and_unmerge_restores_w(string name)
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Spec(name), model, seed: 7);
        TestData.Randomize(method, 3);
        using var scope = DisposeScope.Begin();
        var w0 = model.LinearAt("model.layers.1.self_attn.q_proj").Weight.Clone();
        // A second adapted module of layer 0 (every spec here adapts q_proj; which other one depends on the spec).
        var probe = method.Layers.Keys.First(k => k.StartsWith("model.layers.0.", StringComparison.Ordinal) && !k.EndsWith("q_proj", StringComparison.Ordinal));
        var down0 = model.LinearAt(probe).Weight.Clone();
        var delta0 = method.DeltaWeight(probe);
        var adapted = model.Forward(Input());
        method.Merge();
        Assert.True(method.Merged);
        Assert.True(TestData.MaxAbsDiff(model.LinearAt("model.layers.1.self_attn.q_proj").Weight, w0) > 1e-4);
        Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), adapted) < 1e-5);
        // Merged: W' = W + ΔW, and ΔW still reads the same (Bat recovers W from W' to compute it).
        Assert.True(TestData.MaxAbsDiff(model.LinearAt(probe).Weight, down0 + delta0) < 1e-6);
        Assert.True(TestData.MaxAbsDiff(method.DeltaWeight(probe), delta0) < 1e-5);
        method.Unmerge();
        Assert.True(TestData.MaxAbsDiff(model.LinearAt("model.layers.1.self_attn.q_proj").Weight, w0) < 1e-6);
        Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), adapted) < 1e-5);
    }

    [Theory, MemberData(nameof(Methods))]
    public void Save_then_load_gives_identical_outputs(string name)
    {
        var dir = TestData.TempDir("save");
        using var scope = DisposeScope.Begin();
        Tensor expected;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(Spec(name), model, seed: 7))
        {
            TestData.Randomize(method, 4);
            expected = model.Forward(Input()).Detach();
            var files = method.Save(dir, "tiny-base");
            Assert.All(files, f => Assert.True(File.Exists(Path.Combine(dir, f)), f));
        }
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(Spec(name), model, seed: 99))
        {
            method.Load(dir);
            // XGBLoRA's artifact is its boosters, which load as merged boosters (into W for an fp32 base): same ΔW,
            // other rounding.
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) <= (name == "xgblora" ? 1e-5f : 0f));
        }
    }

    [Fact]
    public void Lora_files_follow_peft()
    {
        var dir = TestData.TempDir("lora-files");
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var spec = new LoraMethod { R = 4, Alpha = 8, Dropout = 0.05, TargetModules = ["v_proj", "q_proj"] };
        using var method = AdapterMethods.Attach(spec, model, seed: 7);
        method.Save(dir, "org/tiny");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
        Assert.Equal("LORA", (string?)config["peft_type"]);
        Assert.Equal("CAUSAL_LM", (string?)config["task_type"]);
        Assert.Equal(4, (int)config["r"]!);
        Assert.Equal(8.0, (double)config["lora_alpha"]!);
        Assert.Equal(0.05, (double)config["lora_dropout"]!);
        Assert.False((bool)config["use_rslora"]!);
        Assert.False((bool)config["use_dora"]!);
        Assert.True((bool)config["init_lora_weights"]!);
        Assert.Equal("none", (string?)config["bias"]);
        Assert.Equal("org/tiny", (string?)config["base_model_name_or_path"]);
        Assert.Equal(["q_proj", "v_proj"], config["target_modules"]!.AsArray().Select(n => (string)n!));

        var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        using (file)
        {
            Assert.Equal(2 * 2 * 2, file.Entries.Count);
            Assert.Equal(new long[] { 4, 64 }, file.Entries["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].Shape);
            Assert.Equal(new long[] { 32, 4 }, file.Entries["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].Shape);
        }
        // A is nn.Linear-initialised: U(-1/√in, 1/√in), not zero; B is zero.
        var layer = (LoraLayer)method.Layers["model.layers.0.self_attn.q_proj"];
        var a = layer.A.ToArray<float>();
        Assert.All(a, v => Assert.InRange(v, -1 / 8f, 1 / 8f));
        Assert.True(a.Max() - a.Min() > 0.15f);
        Assert.All(layer.B.ToArray<float>(), v => Assert.Equal(0f, v));
    }

    [Fact]
    public void Bone_saves_miss_form_and_an_exact_lora_export()
    {
        var dir = TestData.TempDir("bone-files");
        var bone = new BoneMethod { R = 24, TargetModules = All };
        using var scope = DisposeScope.Begin();
        Tensor expected;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(bone, model, seed: 7))
        {
            TestData.Randomize(method, 5);
            expected = model.Forward(Input()).Detach();
            var files = method.Save(dir, "tiny");
            Assert.Contains("lora/adapter_model.safetensors", files);
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
            Assert.Equal("MISS", (string?)config["peft_type"]);
            Assert.Equal(24, (int)config["r"]!);
            Assert.True((bool)config["init_weights"]!);
            using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
            Assert.Equal(new long[] { 24, 176 }, file.Entries["base_model.model.model.layers.1.mlp.up_proj.miss_block"].Shape);

            // The export's ΔW = (alpha/r)·B·A equals Bone's ΔW for every module.
            var lora = Safetensors.Load(Path.Combine(dir, "lora", "adapter_model.safetensors"));
            foreach (var (path, _) in method.Layers)
            {
                var a = lora[$"base_model.model.{path}.lora_A.weight"];
                var b = lora[$"base_model.model.{path}.lora_B.weight"];
                Assert.True(TestData.MaxAbsDiff(b.MatMul(a), method.DeltaWeight(path)) < 1e-6, path);
            }
        }
        var loraConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "lora", "adapter_config.json")))!;
        Assert.Equal("LORA", (string?)loraConfig["peft_type"]);
        Assert.Equal(24, (int)loraConfig["r"]!);
        Assert.Equal(24.0, (double)loraConfig["lora_alpha"]!);

        // Loaded as a plain LoRA on a fresh model, the export reproduces the Bone adapter's outputs.
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(new LoraMethod { R = 24, Alpha = 24, TargetModules = All }, model, seed: 1))
        {
            method.Load(Path.Combine(dir, "lora"));
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) < 1e-5);
        }
    }

    [Fact]
    public void Shape_problems_are_rejected_at_attach()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var e = Assert.Throws<ArgumentException>(() => AdapterMethods.Attach(new BoneMethod { R = 128, TargetModules = ["q_proj"] }, model, 1));
        Assert.Contains("q_proj", e.Message);
        var e2 = Assert.Throws<ArgumentException>(() => AdapterMethods.Attach(new LoraMethod { R = 4, TargetModules = ["x_proj"] }, model, 1));
        Assert.Contains("x_proj", e2.Message);
    }
}
