using System.Text.Json;
using System.Text.Json.Serialization;

namespace FineTune.Domain.Models;

/// <summary>
/// The fields of a Hugging Face <c>config.json</c> that a Llama-family decoder needs (Llama, Mistral, Qwen2).
/// Read by the API for submit-time validation and by the worker to build the model.
/// </summary>
public sealed record ModelConfig
{
    [JsonPropertyName("architectures")] public string[] Architectures { get; init; } = ["LlamaForCausalLM"];
    [JsonPropertyName("model_type")] public string ModelType { get; init; } = "llama";
    [JsonPropertyName("vocab_size")] public int VocabSize { get; init; }
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; init; }
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; init; }
    [JsonPropertyName("num_hidden_layers")] public int NumHiddenLayers { get; init; }
    [JsonPropertyName("num_attention_heads")] public int NumAttentionHeads { get; init; }
    [JsonPropertyName("num_key_value_heads")] public int? NumKeyValueHeads { get; init; }
    [JsonPropertyName("head_dim")] public int? HeadDimOverride { get; init; }
    [JsonPropertyName("rms_norm_eps")] public double RmsNormEps { get; init; } = 1e-6;
    [JsonPropertyName("rope_theta")] public double RopeTheta { get; init; } = 10000.0;
    [JsonPropertyName("max_position_embeddings")] public int MaxPositionEmbeddings { get; init; } = 2048;
    [JsonPropertyName("tie_word_embeddings")] public bool TieWordEmbeddings { get; init; }
    [JsonPropertyName("attention_bias")] public bool AttentionBias { get; init; }
    [JsonPropertyName("mlp_bias")] public bool MlpBias { get; init; }
    [JsonPropertyName("torch_dtype")] public string? TorchDtype { get; init; }
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; init; }
    [JsonPropertyName("eos_token_id")] public JsonElement? EosTokenId { get; init; }
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; init; }
    [JsonPropertyName("rope_scaling")] public RopeScaling? RopeScaling { get; init; }
    /// <summary>transformers ≥ 5 writes rope_theta and the scaling together as <c>rope_parameters</c>.</summary>
    [JsonPropertyName("rope_parameters")] public RopeScaling? RopeParameters { get; init; }
    [JsonPropertyName("sliding_window")] public int? SlidingWindow { get; init; }
    [JsonPropertyName("use_sliding_window")] public bool? UseSlidingWindow { get; init; }

    [JsonIgnore] public int KvHeads => NumKeyValueHeads ?? NumAttentionHeads;
    [JsonIgnore] public int HeadDim => HeadDimOverride ?? HiddenSize / NumAttentionHeads;
    /// <summary>Qwen2 has biases on q, k and v whatever <c>attention_bias</c> says.</summary>
    [JsonIgnore] public bool QkvBias => AttentionBias || ModelType == "qwen2";
    /// <summary>θ of the rotary embedding: rope_parameters.rope_theta when given, else rope_theta.</summary>
    [JsonIgnore] public double EffectiveRopeTheta => RopeParameters?.RopeTheta ?? RopeTheta;
    /// <summary>The rope scaling in force: rope_scaling, else a non-default rope_parameters.</summary>
    [JsonIgnore] public RopeScaling? EffectiveRopeScaling => RopeScaling ?? (RopeParameters is { Kind: not "default" } p ? p : null);
    /// <summary>
    /// The attention window in force: Mistral's sliding_window; Qwen2's only with use_sliding_window (off in the
    /// released models). Within the window the sliding mask equals the causal one, so sequences up to it are exact
    /// with plain causal attention (transformers' sdpa and eager paths give the same logits there); longer ones are
    /// refused (<see cref="SequenceLengthProblem"/>) instead of silently attending past the window.
    /// </summary>
    [JsonIgnore] public int? EffectiveSlidingWindow => ModelType switch
    {
        "qwen2" => UseSlidingWindow == true ? SlidingWindow : null,
        "mistral" => SlidingWindow,
        _ => null,
    };

    /// <summary>Why sequences of <paramref name="maxSeqLength"/> tokens cannot be trained on this model, or null.</summary>
    public string? SequenceLengthProblem(int maxSeqLength) =>
        EffectiveSlidingWindow is { } w && maxSeqLength > w
            ? $"maxSeqLength {maxSeqLength} exceeds the model's sliding_window {w}; sliding-window attention is not implemented, so sequences must fit in the window"
            : null;

    public static readonly string[] SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    public static ModelConfig Parse(string json)
    {
        var config = JsonSerializer.Deserialize<ModelConfig>(json)
            ?? throw new InvalidDataException("config.json is empty");
        var problem = config.Problems().FirstOrDefault();
        if (problem is not null) throw new InvalidDataException($"config.json: {problem}");
        return config;
    }

    public static ModelConfig Load(string modelDir) =>
        Parse(File.ReadAllText(Path.Combine(modelDir, "config.json")));

    public IEnumerable<string> Problems()
    {
        if (!Architectures.Any(a => SupportedArchitectures.Contains(a)))
            yield return $"unsupported architecture '{string.Join(",", Architectures)}'; supported: {string.Join(", ", SupportedArchitectures)}";
        if (VocabSize <= 0) yield return "vocab_size must be positive";
        if (HiddenSize <= 0) yield return "hidden_size must be positive";
        if (IntermediateSize <= 0) yield return "intermediate_size must be positive";
        if (NumHiddenLayers <= 0) yield return "num_hidden_layers must be positive";
        if (NumAttentionHeads <= 0 || HiddenSize % NumAttentionHeads != 0 && HeadDimOverride is null)
            yield return "hidden_size must be a multiple of num_attention_heads";
        if (KvHeads <= 0 || NumAttentionHeads % KvHeads != 0)
            yield return "num_attention_heads must be a multiple of num_key_value_heads";
        if (EffectiveRopeScaling is { } rs)
        {
            if (!RopeScaling.SupportedKinds.Contains(rs.Kind))
                yield return $"unsupported rope_scaling type '{rs.Kind}'; supported: {string.Join(", ", RopeScaling.SupportedKinds)}";
            else if (rs.Kind != "default" && !(rs.Factor > 0))
                yield return "rope_scaling.factor must be positive";
            else if (rs.Kind == "llama3" && !(rs.HighFreqFactor > rs.LowFreqFactor))
                yield return "rope_scaling.high_freq_factor must exceed low_freq_factor";
        }
    }

    /// <summary>The linear modules of one decoder layer, with HF names and (out, in) shapes: what adapters target.</summary>
    public IReadOnlyList<ModuleShape> LayerLinears() =>
    [
        new("q_proj", NumAttentionHeads * HeadDim, HiddenSize),
        new("k_proj", KvHeads * HeadDim, HiddenSize),
        new("v_proj", KvHeads * HeadDim, HiddenSize),
        new("o_proj", HiddenSize, NumAttentionHeads * HeadDim),
        new("gate_proj", IntermediateSize, HiddenSize),
        new("up_proj", IntermediateSize, HiddenSize),
        new("down_proj", HiddenSize, IntermediateSize),
    ];

    /// <summary>HF module path of a layer linear, e.g. model.layers.3.self_attn.q_proj.</summary>
    public static string ModulePath(int layer, string name) =>
        name is "gate_proj" or "up_proj" or "down_proj"
            ? $"model.layers.{layer}.mlp.{name}"
            : $"model.layers.{layer}.self_attn.{name}";
}

/// <summary>HF <c>rope_scaling</c>: "linear" divides positions by the factor; "llama3" rescales the low frequencies.</summary>
public sealed record RopeScaling
{
    [JsonPropertyName("rope_type")] public string? RopeType { get; init; }
    /// <summary>Older configs spell the kind <c>type</c>.</summary>
    [JsonPropertyName("type")] public string? Type { get; init; }
    [JsonPropertyName("factor")] public double Factor { get; init; } = 1.0;
    [JsonPropertyName("low_freq_factor")] public double LowFreqFactor { get; init; } = 1.0;
    [JsonPropertyName("high_freq_factor")] public double HighFreqFactor { get; init; } = 4.0;
    [JsonPropertyName("original_max_position_embeddings")] public int? OriginalMaxPositionEmbeddings { get; init; }
    /// <summary>Only in transformers ≥ 5's rope_parameters.</summary>
    [JsonPropertyName("rope_theta")] public double? RopeTheta { get; init; }

    [JsonIgnore] public string Kind => RopeType ?? Type ?? "default";
    public static readonly string[] SupportedKinds = ["default", "linear", "llama3"];
}

/// <summary>A linear module as adapters see it: HF short name, weight shape (Out, In).</summary>
public sealed record ModuleShape(string Name, int Out, int In);
