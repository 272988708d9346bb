using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Training;

public sealed class LlamaTests
{
    [Fact]
    public void Tiny_model_loads_with_hf_names_and_frozen_weights()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        var names = model.NamedParameters().Select(p => p.Name).ToHashSet();
        Assert.Contains("model.embed_tokens.weight", names);
        Assert.Contains("model.layers.1.self_attn.k_proj.weight", names);
        Assert.Contains("model.layers.0.mlp.down_proj.weight", names);
        Assert.Contains("model.layers.0.post_attention_layernorm.weight", names);
        Assert.Contains("model.norm.weight", names);
        Assert.Contains("lm_head.weight", names);
        Assert.Equal(2 + 2 * 9 + 1, names.Count);
        Assert.All(model.Parameters(), p => Assert.False(p.RequiresGrad));
        Assert.Equal(new long[] { 32, 64 }, model.LinearAt("model.layers.0.self_attn.v_proj").Weight.Shape);
    }

    [Fact]
    public void Forward_gives_logits_and_initial_loss_is_about_ln_vocab()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(3);
        var ids = Tensor.RandInt(0, 259, [2, 24], gen);
        var logits = model.Forward(ids);
        Assert.Equal(new long[] { 2, 24, 259 }, logits.Shape);
        var loss = model.Loss(ids, ids).ItemDouble();
        Assert.InRange(loss, Math.Log(259) - 0.1, Math.Log(259) + 0.1);
    }

    [Fact]
    public void Attention_is_causal_so_right_padding_does_not_change_real_positions()
    {
        using var model = Llama.Load(TestData.TinyModelDir, Device.Cpu, ScalarType.Float32);
        using var scope = DisposeScope.Begin();
        var a = model.Forward(TestData.Ids([256, 10, 20, 30, 40, 258, 258, 258]));
        var b = model.Forward(TestData.Ids([256, 10, 20, 30, 40, 99, 98, 97]));
        Assert.True(TestData.MaxAbsDiff(a.Narrow(1, 0, 5), b.Narrow(1, 0, 5)) < 1e-5);
        Assert.True(TestData.MaxAbsDiff(a.Narrow(1, 5, 3), b.Narrow(1, 5, 3)) > 1e-4);
        // A sequence's logits do not depend on the other rows of its batch.
        var batch = model.Forward(TestData.Ids([256, 10, 20, 30, 40, 258, 258, 258], [256, 1, 2, 3, 4, 5, 6, 7]));
        Assert.True(TestData.MaxAbsDiff(batch.Narrow(0, 0, 1), a) < 1e-5);
    }

    [Fact]
    public void Qwen2_style_biases_and_tied_embeddings_load_and_run()
    {
        var config = TinyModel.DefaultConfig with
        {
            Architectures = ["Qwen2ForCausalLM"], ModelType = "qwen2", TieWordEmbeddings = true, NumKeyValueHeads = 1,
        };
        var dir = TestData.WriteModel("qwen2", seed: 5, config);
        using var model = Llama.Load(dir, Device.Cpu, ScalarType.Float32);
        Assert.Null(model.LmHead);
        Assert.NotNull(model.LinearAt("model.layers.0.self_attn.q_proj").Bias);
        Assert.Null(model.LinearAt("model.layers.0.self_attn.o_proj").Bias);
        using var scope = DisposeScope.Begin();
        var logits = model.Forward(TestData.Ids([256, 72, 105]));
        Assert.Equal(new long[] { 1, 3, 259 }, logits.Shape);
        Assert.True(float.IsFinite(logits.Abs().Max().ItemFloat()));
    }

    [Fact]
    public void Missing_or_misshaped_weights_give_clear_errors()
    {
        var config = ModelConfig.Load(TestData.TinyModelDir);
        var weights = Safetensors.LoadModelFolder(TestData.TinyModelDir);
        weights.Remove("model.norm.weight", out var norm);
        norm!.Dispose();
        var e = Assert.Throws<InvalidDataException>(() => Llama.FromWeights(config, weights, Device.Cpu, ScalarType.Float32));
        Assert.Contains("model.norm.weight", e.Message);

        var wrong = config with { IntermediateSize = 100 };
        var e2 = Assert.Throws<InvalidDataException>(() =>
            Llama.FromWeights(wrong, Safetensors.LoadModelFolder(TestData.TinyModelDir), Device.Cpu, ScalarType.Float32));
        Assert.Contains("gate_proj.weight", e2.Message);
    }

    [Fact]
    public void Rope_scaling_follows_hf()
    {
        var baseConfig = new ModelConfig { HiddenSize = 4096, NumAttentionHeads = 32, RopeTheta = 500000 };
        var plain = Rotary.InverseFrequencies(baseConfig);
        Assert.Equal(64, plain.Length);
        Assert.Equal(1f, plain[0]);
        Assert.Equal((float)(1 / Math.Pow(500000, 2.0 * 10 / 128)), plain[10], 6);

        var linear = Rotary.InverseFrequencies(baseConfig with { RopeScaling = new RopeScaling { Type = "linear", Factor = 4 } });
        Assert.All(Enumerable.Range(0, 64), i => Assert.Equal(plain[i] / 4, linear[i], 6));

        var llama3 = Rotary.InverseFrequencies(baseConfig with
        {
            RopeScaling = new RopeScaling { RopeType = "llama3", Factor = 8, LowFreqFactor = 1, HighFreqFactor = 4, OriginalMaxPositionEmbeddings = 8192 },
        });
        for (var i = 0; i < 64; i++)
        {
            var wavelen = 2 * Math.PI / plain[i];
            if (wavelen < 8192 / 4.0) Assert.Equal(plain[i], llama3[i]);                  // high frequencies kept
            else if (wavelen > 8192) Assert.Equal(plain[i] / 8, llama3[i], 6);            // low frequencies / factor
            else Assert.InRange(llama3[i], plain[i] / 8, plain[i]);                        // smooth blend between
        }
        Assert.Contains(ModelConfig.Parse("""{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"type":"linear","factor":2}}""").RopeScaling!.Kind, new[] { "linear" });
        var bad = Assert.Throws<InvalidDataException>(() => ModelConfig.Parse(
            """{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":2}}"""));
        Assert.Contains("yarn", bad.Message);
    }
}

public sealed class RotaryTests
{
    [Fact]
    public void Apply_uses_hf_rotate_half_convention()
    {
        var config = new ModelConfig { HiddenSize = 8, NumAttentionHeads = 1, RopeTheta = 100 };   // head dim 8
        var rotary = new Rotary(config);
        var inv = Rotary.InverseFrequencies(config);
        using var scope = DisposeScope.Begin();
        var (cos, sin) = rotary.Tables(3, Device.Cpu, ScalarType.Float32);
        var xs = Enumerable.Range(0, 3 * 8).Select(i => (float)Math.Cos(i * 0.7)).ToArray();
        var y = Rotary.Apply(Tensor.From(xs, 1, 1, 3, 8), cos, sin).ToArray<float>();
        for (var p = 0; p < 3; p++)
            for (var j = 0; j < 8; j++)
            {
                var angle = p * (double)inv[j % 4];
                var x = xs[p * 8 + j];
                var partner = j < 4 ? -xs[p * 8 + j + 4] : xs[p * 8 + j - 4];
                Assert.True(Math.Abs(x * Math.Cos(angle) + partner * Math.Sin(angle) - y[p * 8 + j]) < 1e-5, $"p={p} j={j}");
            }
    }
}
