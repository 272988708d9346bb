using System.Text.Json;
using System.Text.Json.Serialization;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;

namespace FineTune.Worker.Training.Model;

/// <summary>
/// Writes a tiny, deterministic, randomly initialised Llama model folder (config.json + model.safetensors) in HF
/// layout: the model tests and demos train when no real checkpoint is at hand. Vocabulary 259 matches the
/// byte-level tokenizer (0–255 bytes, 256 BOS, 257 EOS, 258 pad).
/// </summary>
public static class TinyModel
{
    public static ModelConfig DefaultConfig => new()
    {
        Architectures = ["LlamaForCausalLM"],
        ModelType = "llama",
        VocabSize = 259,
        HiddenSize = 64,
        IntermediateSize = 176,
        NumHiddenLayers = 2,
        NumAttentionHeads = 4,
        NumKeyValueHeads = 2,
        MaxPositionEmbeddings = 512,
        RmsNormEps = 1e-5,
        RopeTheta = 10000,
        TorchDtype = "float32",
        BosTokenId = 256,
        EosTokenId = JsonDocument.Parse("257").RootElement.Clone(),
        PadTokenId = 258,
    };

    /// <summary>Writes the folder and returns its config. Weights ~ N(0, 0.02²), norms 1, biases 0.</summary>
    public static ModelConfig Write(string folder, long seed = 0, ModelConfig? config = null)
    {
        var c = config ?? DefaultConfig;
        var problem = c.Problems().FirstOrDefault();
        if (problem is not null) throw new ArgumentException($"tiny model config: {problem}");
        Directory.CreateDirectory(folder);
        using var gen = new Generator(seed);
        using var scope = DisposeScope.Begin();
        var w = new Dictionary<string, Tensor>();
        Tensor Normal(params long[] shape) => Tensor.Randn(shape, gen) * 0.02;

        w["model.embed_tokens.weight"] = Normal(c.VocabSize, c.HiddenSize);
        for (var l = 0; l < c.NumHiddenLayers; l++)
        {
            foreach (var m in c.LayerLinears())
            {
                var path = ModelConfig.ModulePath(l, m.Name);
                w[$"{path}.weight"] = Normal(m.Out, m.In);
                var biased = m.Name is "q_proj" or "k_proj" or "v_proj" ? c.QkvBias
                    : m.Name == "o_proj" ? c.AttentionBias : c.MlpBias;
                if (biased) w[$"{path}.bias"] = Normal(m.Out);
            }
            w[$"model.layers.{l}.input_layernorm.weight"] = Tensor.Ones([c.HiddenSize]);
            w[$"model.layers.{l}.post_attention_layernorm.weight"] = Tensor.Ones([c.HiddenSize]);
        }
        w["model.norm.weight"] = Tensor.Ones([c.HiddenSize]);
        if (!c.TieWordEmbeddings) w["lm_head.weight"] = Normal(c.VocabSize, c.HiddenSize);

        Safetensors.Save(Path.Combine(folder, "model.safetensors"), w, new Dictionary<string, string> { ["format"] = "pt" });
        var json = JsonSerializer.Serialize(c, new JsonSerializerOptions
        {
            WriteIndented = true,
            DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
        });
        File.WriteAllText(Path.Combine(folder, "config.json"), json);
        return c;
    }
}
