using System.ComponentModel;
using System.Text.Json.Serialization;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// XGBLoRA (arXiv 2410.19694): gradient-boosted low-rank "boosters". Training runs in rounds of stepsPerRound (κ)
/// optimizer steps; each round attaches a fresh rank-`rank` LoRA (A kaiming, B zero) to the targeted modules of a
/// random subset of layersPerRound (L_s) decoder layers (drawn from the job's seed and the round number), trains it
/// with an L2 penalty l2·(‖A‖² + ‖B‖²), then merges it: W += shrinkage·s·B·A with s = alpha/rank. The artifact is the
/// sum of all boosters per module, an exact LoRA whose rank is the number of boosters that touched the module.
/// </summary>
[Description("XGBLoRA: gradient-boosted rank-1 LoRA boosters on random layer subsets, merged into W every stepsPerRound steps; " +
             "exports an exact LoRA (rank = boosters per module) or an SVD-truncated one (exportRank)")]
public sealed record XgbLoraMethod : MethodSpec
{
    public const int MaxRank = 64;
    public const int MaxLayersPerRound = 1024;
    public const int MaxStepsPerRound = 1_000_000;

    [JsonIgnore] public override string Type => "xgblora";
    /// <summary>fp32 tensors; with mixed, the layers' products run in the base's dtype.</summary>
    [JsonIgnore] public override bool SupportsMixedAdapters => true;
    /// <summary>Rank of each booster (the paper's point is rank 1).</summary>
    [DefaultValue(1)] public int Rank { get; init; } = 1;
    /// <summary>Decoder layers that get a booster each round (L_s); above the model's layer count means all layers.</summary>
    [DefaultValue(8)] public int LayersPerRound { get; init; } = 8;
    /// <summary>Optimizer steps per boosting round (κ): the booster is merged and re-initialised after this many.</summary>
    [DefaultValue(20)] public int StepsPerRound { get; init; } = 20;
    /// <summary>L2 penalty weight λ on the booster factors: the loss adds λ(‖A‖² + ‖B‖²).</summary>
    [DefaultValue(0.0001)] public double L2 { get; init; } = 1e-4;
    /// <summary>Weight of a booster when it is merged (gradient boosting's learning rate).</summary>
    [DefaultValue(1.0)] public double Shrinkage { get; init; } = 1.0;
    /// <summary>Booster scale numerator: s = alpha / rank (the paper states no scale; alpha = rank gives s = 1).</summary>
    [DefaultValue(1.0)] public double Alpha { get; init; } = 1.0;
    /// <summary>If set, the <c>lora/</c> export is the SVD truncation of each module's summed boosters to this rank
    /// (the error is recorded); otherwise it is exact, with the rank of the most-boosted module.</summary>
    [DefaultValue(null)] public int? ExportRank { get; init; }

    public double Scaling => Alpha / Rank;

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (Rank is < 1 or > MaxRank) yield return ($"{prefix}.rank", $"must be between 1 and {MaxRank}");
        if (LayersPerRound is < 1 or > MaxLayersPerRound) yield return ($"{prefix}.layersPerRound", $"must be between 1 and {MaxLayersPerRound}");
        if (StepsPerRound is < 1 or > MaxStepsPerRound) yield return ($"{prefix}.stepsPerRound", $"must be between 1 and {MaxStepsPerRound}");
        if (!(L2 >= 0 && L2 <= 1e3)) yield return ($"{prefix}.l2", "must be >= 0 and <= 1000");
        if (!(Shrinkage > 0 && Shrinkage <= 1)) yield return ($"{prefix}.shrinkage", "must be > 0 and <= 1");
        if (!(Alpha > 0 && Alpha <= 1e6)) yield return ($"{prefix}.alpha", "must be > 0 and <= 1e6");
        if (ExportRank is < 1 or > 4096) yield return ($"{prefix}.exportRank", "must be between 1 and 4096");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes).Where(m => Rank > Math.Min(m.In, m.Out)))
            yield return ($"{prefix}.rank", $"rank={Rank} exceeds min(out, in) of module {m.Name} with shape ({m.Out}, {m.In})");
    }

    /// <summary>One booster on one module.</summary>
    public override long TrainableParameters(ModuleShape m) => (long)Rank * (m.In + m.Out);

    /// <summary>min(L_s, layers)·Σ_modules rank·(in+out): only one round's boosters are trained at a time.</summary>
    public override long TotalTrainableParameters(ModelConfig config) =>
        Math.Min(LayersPerRound, config.NumHiddenLayers) * Targeted(config.LayerLinears()).Sum(TrainableParameters);
}
