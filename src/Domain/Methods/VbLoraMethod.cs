using System.ComponentModel;
using System.Text.Json.Serialization;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// VB-LoRA (PEFT: VBLORA): one vector bank V (numVectors, vectorLength) shared by every adapted module; each module's
/// LoRA factors are cut into sub-vectors of length vectorLength, each a softmax-weighted mixture of the topK bank vectors
/// its logits rank highest. A = mix(L_A).reshape(r, in), B = mix(L_B).transpose(1, 2).reshape(out, r), Δy = (x Aᵀ) Bᵀ.
/// Not a no-op at init (logits ~ N(0, 0.1), V ~ U(−0.02, 0.02)).
/// </summary>
[Description("VB-LoRA (PEFT VBLORA): every module's LoRA factors are top-k mixtures of one shared vector bank; tiny artifacts. " +
             "logitsLearningRate and vectorBankLearningRate are absolute (the job's learningRate does not apply; its schedule does)")]
public sealed record VbLoraMethod : MethodSpec
{
    public const int MaxRank = 4096;
    public const int MaxVectors = 65536;
    public const int MaxVectorLength = 65536;
    public const int MaxTopK = 64;
    /// <summary>Bank elements (numVectors · vectorLength) and logits per module are bounded so a job cannot ask for more
    /// memory than a GPU has.</summary>
    public const long MaxBankElements = 1L << 26;
    public const long MaxLogitsPerModule = 1L << 30;

    [JsonIgnore] public override string Type => "vblora";
    /// <summary>The bank and logits stay fp32 (their top-k mix is composed in fp32); the layers' products can run in the base's dtype.</summary>
    [JsonIgnore] public override bool SupportsMixedAdapters => true;
    /// <summary>Rank of the composed A (r, in) and B (out, r).</summary>
    [DefaultValue(4)] public int R { get; init; } = 4;
    /// <summary>Vectors in the shared bank (h).</summary>
    [DefaultValue(256)] public int NumVectors { get; init; } = 256;
    /// <summary>Length of a bank vector (b); must divide every targeted module's in and out sizes.</summary>
    [DefaultValue(256)] public int VectorLength { get; init; } = 256;
    /// <summary>Bank vectors mixed per sub-vector (k).</summary>
    [DefaultValue(2)] public int TopK { get; init; } = 2;
    /// <summary>Dropout on the adapter's input.</summary>
    [DefaultValue(0.0)] public double Dropout { get; init; }
    /// <summary>AdamW learning rate of the logits (absolute; the paper and PEFT use 1e-2).</summary>
    [DefaultValue(0.01)] public double LogitsLearningRate { get; init; } = 1e-2;
    /// <summary>AdamW learning rate of the vector bank (absolute; the paper and PEFT use 1e-3).</summary>
    [DefaultValue(0.001)] public double VectorBankLearningRate { get; init; } = 1e-3;
    /// <summary>Store only the top-k indices and k−1 weights per sub-vector instead of the logits (PEFT's compact form):
    /// much smaller, loads for inference and merging, cannot resume training.</summary>
    [DefaultValue(false)] public bool SaveOnlyTopkWeights { get; init; }

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > MaxRank) yield return ($"{prefix}.r", $"must be between 1 and {MaxRank}");
        if (NumVectors is < 1 or > MaxVectors) yield return ($"{prefix}.numVectors", $"must be between 1 and {MaxVectors}");
        if (VectorLength is < 1 or > MaxVectorLength) yield return ($"{prefix}.vectorLength", $"must be between 1 and {MaxVectorLength}");
        else if (NumVectors >= 1 && (long)NumVectors * VectorLength > MaxBankElements)
            yield return ($"{prefix}.numVectors", $"numVectors·vectorLength = {(long)NumVectors * VectorLength} exceeds {MaxBankElements}");
        if (TopK is < 1 or > MaxTopK) yield return ($"{prefix}.topK", $"must be between 1 and {MaxTopK}");
        else if (TopK > NumVectors) yield return ($"{prefix}.topK", $"topK={TopK} exceeds numVectors={NumVectors}");
        if (!(Dropout >= 0 && Dropout < 1)) yield return ($"{prefix}.dropout", "must be in [0, 1)");
        if (!(LogitsLearningRate > 0 && LogitsLearningRate <= 1)) yield return ($"{prefix}.logitsLearningRate", "must be > 0 and <= 1");
        if (!(VectorBankLearningRate > 0 && VectorBankLearningRate <= 1)) yield return ($"{prefix}.vectorBankLearningRate", "must be > 0 and <= 1");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        if (VectorLength < 1) yield break;
        foreach (var m in Targeted(shapes))
        {
            if (m.In % VectorLength != 0 || m.Out % VectorLength != 0)
                yield return ($"{prefix}.vectorLength",
                    $"vectorLength={VectorLength} must divide both sizes of module {m.Name} with shape ({m.Out}, {m.In})");
            else if (TrainableParameters(m) > MaxLogitsPerModule)
                yield return ($"{prefix}.numVectors",
                    $"r·numVectors·(in+out)/vectorLength = {TrainableParameters(m)} logits for module {m.Name} with shape ({m.Out}, {m.In}) exceeds {MaxLogitsPerModule}");
        }
    }

    /// <summary>The logits of one module: r·h·(in/b) for A and (out/b)·r·h for B.</summary>
    public override long TrainableParameters(ModuleShape m) =>
        VectorLength < 1 ? 0 : (long)R * NumVectors * (m.In / VectorLength + m.Out / VectorLength);

    /// <summary>h·b + Σ_modules r·h·(in+out)/b: the bank is shared by all modules.</summary>
    public override long TotalTrainableParameters(ModelConfig config) =>
        (long)NumVectors * VectorLength + base.TotalTrainableParameters(config);
}
