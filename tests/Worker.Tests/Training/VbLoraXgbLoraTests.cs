using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Methods.VBLoRA;
using FineTune.Worker.Training.Methods.XGBLoRA;
using FineTune.Worker.Training.Model;
using TorchApi = FineTune.Worker.Torch.Torch;

namespace FineTune.Worker.Tests.Training;

public sealed class VbLoraXgbLoraTests
{
    private static readonly string[] All = MethodSpec.AllModules;

    private static readonly VbLoraMethod Vb = new() { R = 4, NumVectors = 32, VectorLength = 16, TopK = 2, TargetModules = All };

    private static Tensor Input() => TestData.Ids([256, 72, 101, 108, 108, 111, 32, 119], [256, 98, 121, 116, 101, 115, 258, 258]);

    private static readonly Lazy<string> Tiny4 = new(() =>
    {
        var dir = Path.Combine(Path.GetTempPath(), $"ft-training-tests-{Environment.ProcessId}", "tiny4");
        TinyModel.Write(dir, 3, TinyModel.DefaultConfig with { NumHiddenLayers = 4 });
        return dir;
    });

    /// <summary>Micro-batches of the tiny text set for a manual loop (ids doubled as labels).</summary>
    private static Tensor Batch(int i)
    {
        var texts = TestData.TextSet(12);
        var rows = new[] { texts[(2 * i) % 12], texts[(2 * i + 1) % 12] }
            .Select(e => new ByteTokenizer().Encode((e.Prompt ?? "") + e.Completion).Take(24).ToArray()).ToArray();
        var len = rows.Max(r => r.Length);
        return TestData.Ids(rows.Select(r => r.Concat(Enumerable.Repeat(258, len - r.Length)).ToArray()).ToArray());
    }

    /// <summary>One optimizer step exactly as <see cref="Trainer"/> runs it (hooks in the same order). These tests draw
    /// nothing from libtorch's global generator (no dropout, no reseeding): test classes run in parallel, and the
    /// trainer tests' resume checks depend on its state.</summary>
    private static void Step(Llama model, IAdapterMethod method, AdamW opt, long step, int microBatches = 1)
    {
        method.BeginStep(step);
        for (var m = 0; m < microBatches; m++)
        {
            using var scope = DisposeScope.Begin();
            var ids = Batch((int)step * microBatches + m);
            (model.Loss(ids, ids, "sum") / 100.0).Backward();
        }
        using (DisposeScope.Begin()) method.Penalty()?.Backward();
        method.EndBackward();
        opt.Step();
        opt.ZeroGrad();
        method.AfterOptimizerStep(step, opt);
    }

    // ------------------------------------------------------------------ binding additions

    [Fact]
    public void Backward_from_several_roots_sums_their_vector_jacobian_products()
    {
        using var gen = new Generator(4);
        using var x = Tensor.Randn([3, 2], gen, requiresGrad: true);
        using var scope = DisposeScope.Begin();
        var (g1, g2, g3) = (Tensor.Randn([3, 2], gen), Tensor.Randn([3, 2], gen), Tensor.Randn([2], gen));
        Tensor.Backward([x * 2, x * x, x.Sum([0])], [g1, g2, null]);      // a null gradient skips its root
        Assert.True(TestData.MaxAbsDiff(x.Grad!, g1 * 2 + x * g2 * 2) < 1e-6);
    }

    [Fact]
    public void AdamW_reset_state_restarts_a_parameter_like_a_fresh_optimizer()
    {
        using var gen = new Generator(2);
        var p = Tensor.Randn([3, 4], gen, requiresGrad: true);
        var other = Tensor.Randn([5], gen, requiresGrad: true);
        var otherRef = other.Detach().Clone().RequiresGrad_();
        using var opt = new AdamW([new ParamGroup("g", [p, other], 0.1, 0.01)]);
        using var refOpt = new AdamW([new ParamGroup("g", [otherRef], 0.1, 0.01)]);
        static void Grad(Tensor t) { using var s = DisposeScope.Begin(); (t * t * t).Sum().Backward(); }
        void StepAll(params AdamW[] opts) { foreach (var o in opts) { o.Step(); o.ZeroGrad(); } }
        for (var i = 0; i < 3; i++) { Grad(p); Grad(other); Grad(otherRef); StepAll(opt, refOpt); }

        opt.ResetState([p]);
        var q = p.Detach().Clone().RequiresGrad_();
        using var fresh = new AdamW([new ParamGroup("g", [q], 0.1, 0.01)]);
        for (var i = 0; i < 2; i++) { Grad(p); Grad(other); Grad(otherRef); Grad(q); StepAll(opt, refOpt, fresh); }
        Assert.True(TestData.MaxAbsDiff(p, q) < 1e-7);                 // bias correction restarted for p
        Assert.True(TestData.MaxAbsDiff(other, otherRef) < 1e-7);      // and not for the others of its group

        var state = opt.StateDict();
        Assert.Equal(3, state["g0.p0.reset_at"].ItemLong());
        Assert.False(state.ContainsKey("g0.p1.reset_at"));
        using var restored = new AdamW([new ParamGroup("g", [p.Detach().Clone().RequiresGrad_(), other.Detach().Clone().RequiresGrad_()], 0.1, 0.01)]);
        restored.LoadStateDict(state);
        Assert.Equal(3, restored.StateDict()["g0.p0.reset_at"].ItemLong());
        Assert.Throws<ArgumentException>(() => opt.ResetState([q]));
    }

    // ------------------------------------------------------------------ VB-LoRA

    [Fact]
    public void Vblora_composes_a_and_b_as_peft_does()
    {
        // Hand-computed top-k mixture with PEFT's reshape (A) and transpose-then-reshape (B) order.
        const int inF = 8, outF = 4, b = 2, r = 3, h = 5, k = 2;
        using var gen = new Generator(21);
        using var linear = new Linear(Tensor.Randn([outF, inF], gen), null);
        using var bank = Tensor.Randn([h, b], gen);
        using var layer = new VbLoraLayer(linear, bank, r, k, 0, 1.0, gen);
        linear.Adapter = layer;
        var v = bank.ToArray<float>();
        float[] Mix(float[] logits, int row)
        {
            var l = logits.Skip(row * h).Take(h).ToArray();
            var top = Enumerable.Range(0, h).OrderByDescending(i => l[i]).Take(k).ToArray();
            var e = top.Select(i => Math.Exp(l[i] - l[top[0]])).ToArray();
            var w = e.Select(x => x / e.Sum()).ToArray();
            return Enumerable.Range(0, b).Select(c => (float)Enumerable.Range(0, k).Sum(j => w[j] * v[top[j] * b + c])).ToArray();
        }
        var la = layer.LogitsA.ToArray<float>();   // (r, in/b, h)
        var lb = layer.LogitsB.ToArray<float>();   // (out/b, r, h)
        var a = new float[r * inF];
        for (var i = 0; i < r; i++)
            for (var t = 0; t < inF / b; t++)
            {
                var m = Mix(la, i * (inF / b) + t);
                for (var c = 0; c < b; c++) a[i * inF + t * b + c] = m[c];
            }
        var bm = new float[outF * r];
        for (var t = 0; t < outF / b; t++)
            for (var i = 0; i < r; i++)
            {
                var m = Mix(lb, t * r + i);
                for (var c = 0; c < b; c++) bm[(t * b + c) * r + i] = m[c];
            }
        using var scope = DisposeScope.Begin();
        var (ca, cb) = layer.Factors();
        Assert.True(TestData.MaxAbsDiff(ca, Tensor.From(a, r, inF)) < 1e-6);
        Assert.True(TestData.MaxAbsDiff(cb, Tensor.From(bm, outF, r)) < 1e-6);
        var x = Tensor.Randn([2, 3, inF], gen);
        var expected = F.Linear(x, linear.Weight) + F.Linear(F.Linear(x, Tensor.From(a, r, inF)), Tensor.From(bm, outF, r));
        Assert.True(TestData.MaxAbsDiff(linear.Forward(x), expected) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(layer.DeltaWeight(), Tensor.From(bm, outF, r).MatMul(Tensor.From(a, r, inF))) < 1e-6);
    }

    [Fact]
    public void Vblora_compose_once_per_step_gives_the_gradients_of_composing_per_micro_batch()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Vb, model, seed: 7);
        var tensors = method.TrainableTensors;

        // Composed in every forward: three micro-batches, each backward goes through its own composition.
        for (var m = 0; m < 3; m++)
        {
            using var scope = DisposeScope.Begin();
            var ids = Batch(m);
            (model.Loss(ids, ids, "sum") / 100.0).Backward();
        }
        var perMicroBatch = tensors.Select(t => t.Tensor.Grad!.Clone()).ToList();
        foreach (var (_, t) in tensors) using (TorchApi.NoGrad()) t.Grad!.Zero_();
        using (var opt = new AdamW(method.ParamGroups(new Hyperparameters()))) opt.ZeroGrad();

        // Composed once: the micro-batches fill the leaf copies; logits and bank get nothing until EndBackward.
        method.BeginStep(0);
        for (var m = 0; m < 3; m++)
        {
            using var scope = DisposeScope.Begin();
            var ids = Batch(m);
            (model.Loss(ids, ids, "sum") / 100.0).Backward();
        }
        Assert.All(tensors, t => Assert.Null(t.Tensor.Grad));
        method.EndBackward();
        for (var i = 0; i < tensors.Count; i++)
        {
            var g = tensors[i].Tensor.Grad!;
            Assert.True(perMicroBatch[i].Abs().Max().ItemDouble() > 0, tensors[i].Name);
            Assert.True(TestData.MaxAbsDiff(g, perMicroBatch[i]) < 1e-5, $"{tensors[i].Name}: {TestData.MaxAbsDiff(g, perMicroBatch[i])}");
        }

        // Outside a step (validation, evaluation) the layers compose on the fly from the current logits.
        using var s2 = DisposeScope.Begin();
        var before = model.Forward(Input());
        var logits = method.TrainableTensors[1].Tensor;
        using (var gen = new Generator(1))
        using (TorchApi.NoGrad()) logits.Add_(Tensor.Randn(logits.Shape, gen));
        Assert.True(TestData.MaxAbsDiff(before, model.Forward(Input())) > 1e-6);
    }

    [Fact]
    public void Vblora_parameters_follow_the_formula_and_two_learning_rates()
    {
        var config = TinyModel.DefaultConfig;
        // Σ(in+out)/b over the 7 linears of a tiny layer: (128 + 96 + 96 + 128 + 240 + 240 + 240) / 16 = 73.
        Assert.Equal(32 * 16 + 2 * 4 * 32 * 73, Vb.TotalTrainableParameters(config));
        var llama2 = new ModelConfig { VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32 };
        var paper = new VbLoraMethod { R = 4, NumVectors = 2048, VectorLength = 256, TopK = 2, TargetModules = All };
        Assert.Empty(paper.ValidateShapes(llama2.LayerLinears()));
        Assert.Equal(2048L * 256 + 32L * 4 * 2048 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) / 256, paper.TotalTrainableParameters(llama2));

        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Vb with { LogitsLearningRate = 0.02, VectorBankLearningRate = 0.003 }, model, seed: 7);
        var groups = method.ParamGroups(new Hyperparameters { LearningRate = 1e-4, WeightDecay = 0.01 });
        Assert.Equal(2, groups.Count);
        Assert.Equal(0.02, groups[0].LearningRate);
        Assert.Equal(2 * 2 * 7, groups[0].Parameters.Count);
        Assert.Equal(0.003, groups[1].LearningRate);
        Assert.Same(((VbLoraAdapter)method).Bank, Assert.Single(groups[1].Parameters));
        Assert.Equal(method.TrainableParameterCount, groups.Sum(g => g.Parameters.Sum(p => p.NumEl)));
    }

    [Fact]
    public void Vblora_shape_and_range_problems_name_the_field_module_and_shape()
    {
        var shapes = TinyModel.DefaultConfig.LayerLinears();
        var e = (Vb with { VectorLength = 32 }).ValidateShapes(shapes).ToList();
        Assert.Contains(e, x => x.Field == "method.vectorLength" && x.Error.Contains("down_proj with shape (64, 176)"));
        Assert.DoesNotContain(e, x => x.Error.Contains("q_proj"));
        Assert.Contains((Vb with { TopK = 40 }).Validate(), x => x.Field == "method.topK" && x.Error.Contains("numVectors=32"));
        Assert.Contains((Vb with { NumVectors = 65536, VectorLength = 65536 }).Validate(), x => x.Field == "method.numVectors");
        Assert.Contains((Vb with { VectorBankLearningRate = 0 }).Validate(), x => x.Field == "method.vectorBankLearningRate");
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var ex = Assert.Throws<ArgumentException>(() => AdapterMethods.Attach(Vb with { VectorLength = 64 }, model, 1));
        Assert.Contains("k_proj with shape (32, 64)", ex.Message);
    }

    [Fact]
    public void Vblora_saves_peft_files_and_an_exact_lora_export()
    {
        var dir = TestData.TempDir("vblora-files");
        using var scope = DisposeScope.Begin();
        Tensor expected;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(Vb with { TargetModules = ["q_proj", "down_proj"] }, model, seed: 7))
        {
            expected = model.Forward(Input()).Detach();
            var files = method.Save(dir, "org/tiny");
            Assert.Contains("lora/adapter_model.safetensors", files);
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
            Assert.Equal("VBLORA", (string?)config["peft_type"]);
            Assert.Equal(4, (int)config["r"]!);
            Assert.Equal(32, (int)config["num_vectors"]!);
            Assert.Equal(16, (int)config["vector_length"]!);
            Assert.Equal(2, (int)config["topk"]!);
            Assert.False((bool)config["save_only_topk_weights"]!);
            Assert.Equal(0.02, (double)config["init_vector_bank_bound"]!);
            Assert.Equal(0.1, (double)config["init_logits_std"]!);
            Assert.Equal(["q_proj", "down_proj"], config["target_modules"]!.AsArray().Select(n => (string)n!));
            using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
            Assert.Equal(1 + 2 * 2 * 2, file.Entries.Count);
            Assert.Equal(new long[] { 32, 16 }, file.Entries["base_model.vblora_vector_bank"].Shape);
            Assert.Equal(new long[] { 4, 176 / 16, 32 }, file.Entries["base_model.model.model.layers.1.mlp.down_proj.vblora_logits_A"].Shape);
            Assert.Equal(new long[] { 64 / 16, 4, 32 }, file.Entries["base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_B"].Shape);
            // The bank is U(−0.02, 0.02), the logits N(0, 0.1).
            var bank = ((VbLoraAdapter)method).Bank.ToArray<float>();
            Assert.All(bank, x => Assert.InRange(x, -0.02f, 0.02f));
            var logits = ((VbLoraLayer)method.Layers["model.layers.0.self_attn.q_proj"]).LogitsA.ToArray<float>();
            var std = Math.Sqrt(logits.Select(x => (double)x * x).Average());
            Assert.InRange(std, 0.08, 0.12);
        }
        var loraConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "lora", "adapter_config.json")))!;
        Assert.Equal(4, (int)loraConfig["r"]!);
        Assert.Equal(4.0, (double)loraConfig["lora_alpha"]!);
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(new LoraMethod { R = 4, Alpha = 4, TargetModules = ["q_proj", "down_proj"] }, model, seed: 1))
        {
            method.Load(Path.Combine(dir, "lora"));
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) < 1e-5);
        }
    }

    [Theory]
    [InlineData(3)]
    [InlineData(1)]     // k − 1 = 0 stored weights: the single vector has weight 1
    public void Vblora_top_k_form_stores_indices_and_weights_and_reproduces_outputs(int k)
    {
        var dir = TestData.TempDir("vblora-topk");
        var spec = Vb with { SaveOnlyTopkWeights = true, TopK = k };
        using var scope = DisposeScope.Begin();
        Tensor expected;
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 7))
        {
            TestData.Randomize(method, 8, scale: 0.5);
            expected = model.Forward(Input()).Detach();
            method.Save(dir, "tiny");
        }
        using (var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors")))
        {
            Assert.DoesNotContain(file.Entries.Keys, k => k.EndsWith("vblora_logits_A", StringComparison.Ordinal));
            var idx = file.Entries["base_model.model.model.layers.0.mlp.up_proj.vblora_logits_B_topk_indices"];
            Assert.Equal("U8", idx.DType);                      // 32 vectors: PEFT's uint8
            Assert.Equal(new long[] { 176 / 16, 4, k }, idx.Shape);
            Assert.Equal(new long[] { 176 / 16, 4, k - 1 }, file.Entries["base_model.model.model.layers.0.mlp.up_proj.vblora_logits_B_topk_weights"].Shape);
            Assert.True(file.Entries.ContainsKey("base_model.vblora_vector_bank"));
        }
        Assert.Equal(ScalarType.Int16, VbLoraAdapter.IndexDType(256));
        Assert.Equal(ScalarType.Int32, VbLoraAdapter.IndexDType(1 << 15));
        using (var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 99))
        {
            method.Load(dir);
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) < 1e-5);
        }
    }

    // ------------------------------------------------------------------ XGBLoRA

    private static XgbLoraMethod Xgb(int layersPerRound = 2, int steps = 3) =>
        new() { Rank = 1, LayersPerRound = layersPerRound, StepsPerRound = steps, L2 = 1e-3, Alpha = 2, Shrinkage = 0.5, TargetModules = ["q_proj", "v_proj", "down_proj"] };

    [Fact]
    public void Xgblora_layer_subsets_differ_across_rounds_and_come_from_the_seed()
    {
        var rounds = Enumerable.Range(0, 8).Select(r => XgbLoraAdapter.RoundLayers(42, r, 32, 8)).ToList();
        Assert.All(rounds, r =>
        {
            Assert.Equal(8, r.Length);
            Assert.Equal(r.Order(), r);
            Assert.Equal(8, r.Distinct().Count());
            Assert.All(r, l => Assert.InRange(l, 0, 31));
        });
        Assert.True(rounds.Select(r => string.Join(",", r)).Distinct().Count() >= 7);
        Assert.Equal(rounds[3], XgbLoraAdapter.RoundLayers(42, 3, 32, 8));
        Assert.NotEqual(rounds[3], XgbLoraAdapter.RoundLayers(43, 3, 32, 8));
        Assert.Equal(Enumerable.Range(0, 4), XgbLoraAdapter.RoundLayers(1, 0, 4, 4));
    }

    [Fact]
    public void Xgblora_merges_its_boosters_every_round_and_starts_fresh_ones()
    {
        using var model = Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32);
        var method = (XgbLoraAdapter)AdapterMethods.Attach(Xgb(), model, seed: 5);
        using var _ = method;
        using var opt = new AdamW(method.ParamGroups(new Hyperparameters { LearningRate = 1e-2 }));
        Assert.Equal(2 * (64 + 64 + 32 + 64 + 64 + 176), method.TrainableParameterCount);
        Assert.Equal(XgbLoraAdapter.RoundLayers(5, 0, 4, 2), method.Rounds[0]);
        var w0 = Enumerable.Range(0, 4).Select(l => model.LinearAt(ModelConfig.ModulePath(l, "q_proj")).Weight.Clone()).ToList();
        var o0 = model.LinearAt("model.layers.0.self_attn.o_proj").Weight.Clone();
        var first = method.Rounds[0];

        for (long s = 0; s < 2; s++) Step(model, method, opt, s);
        Assert.All(Enumerable.Range(0, 4), l => Assert.Equal(0f, TestData.MaxAbsDiff(model.LinearAt(ModelConfig.ModulePath(l, "q_proj")).Weight, w0[l])));
        var trained = method.TrainableTensors.ToDictionary(t => t.Name, t => t.Tensor.Clone());

        Step(model, method, opt, 2);                       // κ = 3: round 0 ends here
        Assert.Equal(2, method.Rounds.Count);
        Assert.Equal(XgbLoraAdapter.RoundLayers(5, 1, 4, 2), method.Rounds[1]);
        for (var l = 0; l < 4; l++)
        {
            var q = (XgbLoraLayer)method.Layers[ModelConfig.ModulePath(l, "q_proj")];
            var changed = TestData.MaxAbsDiff(q.Base.Weight, w0[l]);
            if (first.Contains(l))
            {
                Assert.True(changed > 1e-7, $"layer {l} was boosted but W did not change");
                Assert.Equal(1, q.MergedRank);
                // W = W₀ + shrinkage·s·B·A, with the last step's A and B.
                var j = Array.IndexOf(first, l);
                var a = method.TrainableTensors.Single(t => t.Name == $"base_model.xgblora_booster.{j}.q_proj.lora_A.weight").Tensor;
                Assert.True(TestData.MaxAbsDiff(q.Base.Weight - w0[l], q.MergedB!.MatMul(q.MergedA!)) < 1e-7);
                Assert.True(TestData.MaxAbsDiff(q.MergedA!, a) > 1e-4, "the slot's A was not re-drawn");
            }
            else
            {
                Assert.Equal(0f, changed);
                Assert.Equal(0, q.MergedRank);
            }
            Assert.Equal(method.Rounds[1].Contains(l), q.Booster is not null);
        }
        Assert.Equal(0f, TestData.MaxAbsDiff(model.LinearAt("model.layers.0.self_attn.o_proj").Weight, o0));   // not targeted
        // Fresh boosters: B = 0, A drawn anew, and their AdamW moments forgotten.
        foreach (var (name, t) in method.TrainableTensors)
            if (name.EndsWith("lora_B.weight", StringComparison.Ordinal)) Assert.Equal(0f, t.Abs().Max().ItemFloat());
            else Assert.True(TestData.MaxAbsDiff(t, trained[name]) > 1e-4);
        var state = opt.StateDict();
        Assert.All(state.Where(kv => kv.Key.EndsWith("exp_avg", StringComparison.Ordinal)), kv => Assert.Equal(0f, kv.Value.Abs().Max().ItemFloat()));
        Assert.Equal(3, state["g0.p0.reset_at"].ItemLong());

        for (long s = 3; s < 6; s++) Step(model, method, opt, s);
        Assert.Equal(3, method.Rounds.Count);
        var boosted = method.Rounds.Take(2).SelectMany(r => r).ToList();
        for (var l = 0; l < 4; l++)
            Assert.Equal(boosted.Count(x => x == l), ((XgbLoraLayer)method.Layers[ModelConfig.ModulePath(l, "v_proj")]).MergedRank);
    }

    [Fact]
    public void Xgblora_penalty_is_l2_of_the_boosters()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var method = AdapterMethods.Attach(Xgb() with { L2 = 0.25 }, model, seed: 5);
        TestData.Randomize(method, 3);
        using var scope = DisposeScope.Begin();
        var expected = 0.25 * method.TrainableTensors.Sum(t => t.Tensor.ToArray<float>().Sum(x => (double)x * x));
        Assert.Equal(expected, method.Penalty()!.ItemDouble(), 5);
        var penalty = method.Penalty()!;
        penalty.Backward();
        var (_, a) = method.TrainableTensors[0];
        Assert.True(TestData.MaxAbsDiff(a.Grad!, a * 0.5) < 1e-6);      // d/dA λ‖A‖² = 2λA
        using var none = AdapterMethods.Attach(Xgb() with { L2 = 0 }, Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32), 5);
        Assert.Null(none.Penalty());
    }

    [Fact]
    public void Xgblora_boosters_applied_in_forward_equal_boosters_merged_into_w()
    {
        // A bf16 base keeps merged boosters as fp32 factors in forward; forced here on fp32 to compare both paths.
        using var scope = DisposeScope.Begin();
        Tensor[] Run(bool intoBase, out XgbLoraLayer probe, out Tensor w)
        {
            var model = Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32);
            var method = (XgbLoraAdapter)AdapterMethods.Attach(Xgb(steps: 2), model, seed: 5);
            method.MergeIntoBase = intoBase;
            using var opt = new AdamW(method.ParamGroups(new Hyperparameters { LearningRate = 1e-2 }));
            for (long s = 0; s < 7; s++) Step(model, method, opt, s);
            probe = (XgbLoraLayer)method.Layers[ModelConfig.ModulePath(method.Rounds[0][0], "q_proj")];
            w = probe.Base.Weight.Clone();
            return [model.Forward(Input()).Detach(), probe.MergedA!.Clone(), probe.MergedB!.Clone()];
        }
        var merged = Run(true, out var p1, out var w1);
        var applied = Run(false, out var p2, out var w2);
        Assert.True(p1.MergedInBase);
        Assert.False(p2.MergedInBase);
        Assert.True(TestData.MaxAbsDiff(merged[0], applied[0]) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(merged[1], applied[1]) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(w1 - w2, merged[2].MatMul(merged[1])) < 1e-6);    // only the merged copy changed W
    }

    [Fact]
    public void Xgblora_exports_the_boosters_as_an_exact_lora_or_svd_truncated()
    {
        var dir = TestData.TempDir("xgb-files");
        var svd = TestData.TempDir("xgb-svd");
        using var scope = DisposeScope.Begin();
        Tensor expected;
        var spec = Xgb(layersPerRound: 1, steps: 2);
        using (var model = Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, seed: 9))
        {
            using var opt = new AdamW(method.ParamGroups(new Hyperparameters { LearningRate = 2e-2 }));
            for (long s = 0; s < 9; s++) Step(model, method, opt, s);     // 4 rounds done, the 5th one step in
            expected = model.Forward(Input()).Detach();
            var xgb = (XgbLoraAdapter)method;
            var files = method.Save(dir, "tiny4");
            Assert.Contains("lora/adapter_model.safetensors", files);
            var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")))!;
            Assert.Equal("XGBLORA", (string?)config["peft_type"]);
            Assert.Equal(5, (int)config["rounds"]!);
            Assert.Equal(1, (int)config["layers_per_round"]!);
            using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
            var rounds = Safetensors.Load(Path.Combine(dir, "adapter_model.safetensors"))["base_model.xgblora_rounds"].ToArray<int>();
            Assert.Equal(xgb.Rounds.Select(r => r[0]), rounds);
            foreach (var l in Enumerable.Range(0, 4))
            {
                var boosters = rounds.Count(x => x == l);
                var key = $"base_model.model.{ModelConfig.ModulePath(l, "down_proj")}.xgblora_A";
                if (boosters == 0) Assert.False(file.Entries.ContainsKey(key));
                else Assert.Equal(new long[] { boosters, 176 }, file.Entries[key].Shape);
            }
            var loraConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "lora", "adapter_config.json")))!;
            Assert.Equal(rounds.GroupBy(x => x).Max(g => g.Count()), (int)loraConfig["r"]!);
            Assert.True((bool)method.ExportInfo!["exact"]!);

            var truncated = AdapterMethods.Attach(spec with { ExportRank = 1 }, Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32), 9);
            using (truncated)
            {
                truncated.Load(dir);
                truncated.Save(svd, "tiny4");
                Assert.Equal(1L, (long)truncated.ExportInfo!["r"]!);
                if (rounds.GroupBy(x => x).Max(g => g.Count()) > 1)
                {
                    Assert.False((bool)truncated.ExportInfo!["exact"]!);
                    Assert.InRange((double)truncated.ExportInfo!["max_relative_error"]!, 1e-9, 1.0);
                }
            }
        }
        // Loaded as a plain LoRA on the original weights, the export reproduces the trained model.
        using (var model = Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32))
        {
            var r = (int)JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "lora", "adapter_config.json")))!["r"]!;
            using var lora = AdapterMethods.Attach(new LoraMethod { R = r, Alpha = r, TargetModules = ["q_proj", "v_proj", "down_proj"] }, model, 1);
            lora.Load(Path.Combine(dir, "lora"));
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) < 1e-5);
        }
        // And the native form loads back onto the original weights with the same outputs.
        using (var model = Llama.Load(Tiny4.Value, Device.Cpu, ScalarType.Float32))
        using (var method = AdapterMethods.Attach(spec, model, 1))
        {
            method.Load(dir);
            Assert.True(TestData.MaxAbsDiff(model.Forward(Input()), expected) < 1e-5);
        }
    }

    [Fact]
    public void Xgblora_validation_names_the_field()
    {
        Assert.Contains((Xgb() with { LayersPerRound = 0 }).Validate(), e => e.Field == "method.layersPerRound");
        Assert.Contains((Xgb() with { StepsPerRound = 0 }).Validate(), e => e.Field == "method.stepsPerRound");
        Assert.Contains((Xgb() with { Shrinkage = 1.5 }).Validate(), e => e.Field == "method.shrinkage");
        Assert.Contains((Xgb() with { L2 = -1 }).Validate(), e => e.Field == "method.l2");
        Assert.Contains((Xgb() with { ExportRank = 0 }).Validate(), e => e.Field == "method.exportRank");
        Assert.Contains((Xgb() with { Rank = 40 }).ValidateShapes(TinyModel.DefaultConfig.LayerLinears()),
            e => e.Field == "method.rank" && e.Error.Contains("v_proj with shape (32, 64)"));
        // L_s above the layer count means every layer.
        Assert.Equal(2 * (64 + 64), (Xgb(layersPerRound: 9) with { TargetModules = ["q_proj"] }).TotalTrainableParameters(TinyModel.DefaultConfig));
    }
}
