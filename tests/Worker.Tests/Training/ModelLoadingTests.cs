using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

/// <summary>Hugging Face model folders of every supported shape, written here (random weights, small vocabulary).</summary>
public sealed class ModelLoadingTests
{
    private static Tensor Logits(string dir, ScalarType dtype = ScalarType.Float32)
    {
        using var model = Llama.Load(dir, Device.Cpu, dtype);
        using var noGrad = global::FineTune.Worker.Torch.Torch.NoGrad();
        return model.Forward(TestData.Ids([256, 72, 101, 108, 108, 111, 33, 10], [256, 1, 2, 3, 4, 5, 6, 7])).To(ScalarType.Float32).MoveToOuterScope();
    }

    [Fact]
    public void A_sharded_checkpoint_loads_the_same_weights_as_a_single_file()
    {
        using var scope = DisposeScope.Begin();
        var single = TestData.WriteModel("single", seed: 11);
        var sharded = TestData.WriteModel("sharded", seed: 11, shards: 3);
        Assert.False(File.Exists(Path.Combine(sharded, "model.safetensors")));
        Assert.True(File.Exists(Path.Combine(sharded, "model-00003-of-00003.safetensors")));
        Assert.Equal(3, Safetensors.ReadIndex(Path.Combine(sharded, "model.safetensors.index.json")).Values.Distinct().Count());
        Assert.Equal(0f, TestData.MaxAbsDiff(Logits(single), Logits(sharded)));
    }

    [Fact]
    public void Tied_embeddings_reuse_the_input_embedding_as_the_head()
    {
        using var scope = DisposeScope.Begin();
        var dir = TestData.WriteModel("tied", seed: 12, TinyModel.DefaultConfig with { TieWordEmbeddings = true });
        using var model = Llama.Load(dir, Device.Cpu, ScalarType.Float32);
        Assert.Null(model.LmHead);
        Assert.DoesNotContain("lm_head.weight", model.NamedParameters().Select(p => p.Name));
        var ids = TestData.Ids([256, 10, 20, 30]);
        var expected = F.Linear(model.Hidden(ids), model.Model.EmbedTokens.Weight);
        Assert.Equal(0f, TestData.MaxAbsDiff(expected, model.Forward(ids)));
    }

    [Fact]
    public void Qwen2_has_q_k_v_biases_that_change_the_output()
    {
        using var scope = DisposeScope.Begin();
        var config = TinyModel.DefaultConfig with { Architectures = ["Qwen2ForCausalLM"], ModelType = "qwen2", SlidingWindow = 8, UseSlidingWindow = false };
        var dir = TestData.WriteModel("qwen2-bias", seed: 13, config);
        using var model = Llama.Load(dir, Device.Cpu, ScalarType.Float32);
        foreach (var name in new[] { "q_proj", "k_proj", "v_proj" })
            Assert.NotNull(model.LinearAt($"model.layers.1.self_attn.{name}").Bias);
        Assert.Null(model.LinearAt("model.layers.1.self_attn.o_proj").Bias);
        Assert.Null(model.LinearAt("model.layers.1.mlp.up_proj").Bias);
        var ids = TestData.Ids([256, 10, 20, 30, 40, 50, 60, 70, 80, 90]);   // longer than sliding_window: Qwen2 ignores it unless use_sliding_window
        var before = model.Forward(ids).MoveToOuterScope();
        using (global::FineTune.Worker.Torch.Torch.NoGrad()) model.LinearAt("model.layers.0.self_attn.v_proj").Bias!.Zero_();
        Assert.True(TestData.MaxAbsDiff(before, model.Forward(ids)) > 1e-6);
    }

    [Fact]
    public void Mistral_style_models_run_within_their_sliding_window_and_refuse_longer_sequences()
    {
        using var scope = DisposeScope.Begin();
        var config = TinyModel.DefaultConfig with
        {
            Architectures = ["MistralForCausalLM"], ModelType = "mistral", SlidingWindow = 6, HeadDimOverride = 32, NumAttentionHeads = 4,
        };
        var dir = TestData.WriteModel("mistral", seed: 14, config);
        using var model = Llama.Load(dir, Device.Cpu, ScalarType.Float32);
        Assert.Equal(new long[] { 128, 64 }, model.LinearAt("model.layers.0.self_attn.q_proj").Weight.Shape);   // head_dim × heads ≠ hidden
        Assert.Equal(new long[] { 1, 6, 259 }, model.Forward(TestData.Ids([256, 1, 2, 3, 4, 5])).Shape);
        var e = Assert.Throws<ArgumentException>(() => model.Forward(TestData.Ids([256, 1, 2, 3, 4, 5, 6])));
        Assert.Contains("sliding_window 6", e.Message);
        Assert.Null(ModelConfig.Load(dir).SequenceLengthProblem(6));
        Assert.Contains("maxSeqLength 7", ModelConfig.Load(dir).SequenceLengthProblem(7));
    }

    [Theory]
    [InlineData("linear")]
    [InlineData("llama3")]
    public void Rope_scaling_changes_positions_as_configured(string kind)
    {
        using var scope = DisposeScope.Begin();
        var scaling = new RopeScaling { RopeType = kind, Factor = 4, LowFreqFactor = 1, HighFreqFactor = 4, OriginalMaxPositionEmbeddings = 16 };
        var plain = TestData.WriteModel($"rope-plain-{kind}", seed: 15);
        var scaled = TestData.WriteModel($"rope-{kind}", seed: 15, TinyModel.DefaultConfig with { RopeScaling = scaling });
        Assert.Equal(kind, ModelConfig.Load(scaled).EffectiveRopeScaling!.Kind);
        Assert.True(TestData.MaxAbsDiff(Logits(plain), Logits(scaled)) > 1e-5);
        // transformers ≥ 5 writes the same as rope_parameters, with rope_theta inside.
        var v5 = TestData.WriteModel($"rope-v5-{kind}", seed: 15,
            TinyModel.DefaultConfig with { RopeTheta = 1, RopeParameters = scaling with { RopeTheta = 10000 } });
        Assert.Equal(0f, TestData.MaxAbsDiff(Logits(scaled), Logits(v5)));
    }

    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void Half_precision_weights_load_into_the_requested_dtype(ScalarType stored)
    {
        using var scope = DisposeScope.Begin();
        var f32 = TestData.WriteModel("dtype-f32", seed: 16);
        var half = TestData.WriteModel($"dtype-{stored}", seed: 16, dtype: stored);
        Assert.Equal(stored == ScalarType.BFloat16 ? "BF16" : "F16", new SafetensorsFileInfo(Path.Combine(half, "model.safetensors")).FirstDType);
        using var full = Llama.Load(f32, Device.Cpu, ScalarType.Float32);
        using var fromHalf = Llama.Load(half, Device.Cpu, ScalarType.Float32);
        var w = full.LinearAt("model.layers.0.mlp.gate_proj").Weight;
        var h = fromHalf.LinearAt("model.layers.0.mlp.gate_proj").Weight;
        Assert.Equal(ScalarType.Float32, h.DType);
        Assert.Equal(0f, TestData.MaxAbsDiff(w.To(stored).To(ScalarType.Float32), h));   // the stored values, widened exactly
        Assert.True(TestData.MaxAbsDiff(w, h) > 0);
        using var asStored = Llama.Load(f32, Device.Cpu, stored);
        Assert.All(asStored.Parameters(), p => Assert.Equal(stored, p.DType));
    }

    [Fact]
    public void A_truncated_shard_is_a_clear_error()
    {
        var dir = TestData.WriteModel("truncated", seed: 17, shards: 2);
        var shard = Path.Combine(dir, "model-00002-of-00002.safetensors");
        using (var f = File.Open(shard, FileMode.Open)) f.SetLength(f.Length - 100);
        var e = Assert.Throws<SafetensorsException>(() => Llama.Load(dir, Device.Cpu, ScalarType.Float32));
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void A_shard_missing_from_disk_or_a_tensor_missing_from_the_index_is_a_clear_error()
    {
        var dir = TestData.WriteModel("missing-shard", seed: 18, shards: 2);
        File.Delete(Path.Combine(dir, "model-00001-of-00002.safetensors"));
        Assert.Contains("model-00001-of-00002.safetensors' does not exist",
            Assert.Throws<SafetensorsException>(() => Llama.Load(dir, Device.Cpu, ScalarType.Float32)).Message);

        var dir2 = TestData.WriteModel("missing-tensor", seed: 18, shards: 2);
        var indexPath = Path.Combine(dir2, "model.safetensors.index.json");
        var index = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(indexPath))!;
        index["weight_map"]!.AsObject().Remove("model.layers.1.mlp.down_proj.weight");
        File.WriteAllText(indexPath, index.ToJsonString());
        Assert.Contains("lack tensor 'model.layers.1.mlp.down_proj.weight'",
            Assert.Throws<InvalidDataException>(() => Llama.Load(dir2, Device.Cpu, ScalarType.Float32)).Message);
    }

    [Fact]
    public void An_unsupported_architecture_is_named()
    {
        var dir = TestData.WriteModel("gpt2", seed: 19);
        File.WriteAllText(Path.Combine(dir, "config.json"),
            File.ReadAllText(Path.Combine(dir, "config.json")).Replace("LlamaForCausalLM", "GPT2LMHeadModel"));
        var e = Assert.Throws<InvalidDataException>(() => Llama.Load(dir, Device.Cpu, ScalarType.Float32));
        Assert.Contains("unsupported architecture 'GPT2LMHeadModel'", e.Message);
        Assert.Contains("MistralForCausalLM", e.Message);
    }
}

/// <summary>The dtype a safetensors file stores (its first tensor's), read from the header.</summary>
internal sealed class SafetensorsFileInfo(string path)
{
    public string FirstDType { get; } = ReadFirst(path);

    private static string ReadFirst(string path)
    {
        using var f = SafetensorsFile.Open(path);
        return f.Entries.Values.First().DType;
    }
}
