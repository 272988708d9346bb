using System.Text.Json;
using System.Text.Json.Nodes;
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

    /// <summary>Writes the folder and returns its config. Weights and biases ~ N(0, 0.02²), norms 1.
    /// <paramref name="shards"/> &gt; 1 writes model-0000N-of-0000M.safetensors files and model.safetensors.index.json,
    /// as save_pretrained does for large models; <paramref name="dtype"/> is the dtype stored (F32, F16 or BF16).</summary>
    public static ModelConfig Write(string folder, long seed = 0, ModelConfig? config = null, int shards = 1,
        ScalarType dtype = ScalarType.Float32)
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

        if (dtype != ScalarType.Float32)
            foreach (var name in w.Keys.ToList()) w[name] = w[name].To(dtype);
        WriteWeights(folder, w, shards);
        var json = JsonSerializer.Serialize(c, new JsonSerializerOptions
        {
            WriteIndented = true,
            DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
        });
        File.WriteAllText(Path.Combine(folder, "config.json"), json);
        return c;
    }

    /// <summary>One model.safetensors, or <paramref name="shards"/> files of about equal size with their index.</summary>
    public static void WriteWeights(string folder, IReadOnlyDictionary<string, Tensor> weights, int shards = 1)
    {
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        if (shards <= 1)
        {
            Safetensors.Save(Path.Combine(folder, "model.safetensors"), weights, metadata);
            return;
        }
        var names = weights.Keys.Order(StringComparer.Ordinal).ToList();
        var total = weights.Values.Sum(t => t.NumEl * t.ElementSize);
        var map = new JsonObject();
        var perShard = (names.Count + shards - 1) / shards;
        for (var s = 0; s < shards; s++)
        {
            var file = $"model-{s + 1:D5}-of-{shards:D5}.safetensors";
            var part = names.Skip(s * perShard).Take(perShard).ToDictionary(n => n, n => weights[n]);
            Safetensors.Save(Path.Combine(folder, file), part, metadata);
            foreach (var n in part.Keys) map[n] = file;
        }
        var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = total }, ["weight_map"] = map };
        File.WriteAllText(Path.Combine(folder, "model.safetensors.index.json"), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
