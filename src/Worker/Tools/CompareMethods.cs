using FineTune.Domain.Methods;
using FineTune.Domain.Models;

namespace FineTune.Worker.Tools;

/// <summary>
/// The methods of the comparison and how each is fitted to a trainable-parameter budget: every variant lists the
/// options it may take (in order of preference), and the one whose <see cref="MethodSpec.TotalTrainableParameters"/>
/// on the model's module shapes is closest to the budget wins (ties: the earlier one). All 7 linears are adapted.
/// </summary>
public sealed record CompareVariant(string Label, string Type, string Notes, Func<ModelConfig, CompareContext, IEnumerable<MethodSpec>> Candidates);

/// <summary>What a variant's candidates may depend on besides the model: the budget's bone r and the run's steps.</summary>
public sealed record CompareContext(int BoneR, int Steps);

/// <summary>A variant fitted to the budget, or the reason it cannot be.</summary>
public sealed record ComparePlan(CompareVariant Variant, MethodSpec? Spec, long Trainable, string? SkipReason);

public static class CompareMethods
{
    private static readonly string[] All = MethodSpec.AllModules;
    /// <summary>How far from the budget a method's closest option may be and still be compared.</summary>
    public const double MaxMismatch = 0.25;

    /// <summary>The variants, in the table's order. LoRA-family alpha = 2r (s = 2) except PiSSA/OLoRA (alpha = r, their
    /// papers' setting: the initial factors are W's own, scaled by s); dropout 0 everywhere, so the comparison is of
    /// the parametrisations.</summary>
    public static readonly IReadOnlyList<CompareVariant> Variants =
    [
        new("lora", "lora", "alpha = 2r", (c, _) => Ranks(c).Select(r => new LoraMethod { R = r, Alpha = 2 * r, TargetModules = All })),
        new("pissa", "lora", "init pissa, alpha = r",
            (c, _) => Ranks(c).Select(r => new LoraMethod { R = r, Alpha = r, Init = LoraFamilyMethod.InitPissa, TargetModules = All })),
        new("olora", "lora", "init olora, alpha = r",
            (c, _) => Ranks(c).Select(r => new LoraMethod { R = r, Alpha = r, Init = LoraFamilyMethod.InitOlora, TargetModules = All })),
        new("lora+", "lora", "alpha = 2r, loraPlusRatio 16 (B at 16x the learning rate)",
            (c, _) => Ranks(c).Select(r => new LoraMethod { R = r, Alpha = 2 * r, LoraPlusRatio = 16, TargetModules = All })),
        new("dora", "dora", "alpha = 2r", (c, _) => Ranks(c).Select(r => new DoraMethod { R = r, Alpha = 2 * r, TargetModules = All })),
        new("bone", "bone", "r = the budget's", (_, x) => [new BoneMethod { R = x.BoneR, TargetModules = All }]),
        new("bat", "bat", "grouping col; r must divide every module's sizes",
            (c, _) => Ranks(c).Select(r => new BatMethod { R = r, TargetModules = All })),
        new("sbora-fa", "sbora", "alpha = 2r, dropout 0",
            (c, _) => Ranks(c).Select(r => new SboraMethod { Variant = "fa", R = r, Alpha = 2 * r, Dropout = 0, TargetModules = All })),
        new("vblora", "vblora", "r 4, topK 2, vectorLength 256 or the largest power of two dividing every size; its own absolute learning rates (logits 1e-2, bank 1e-3)",
            (c, _) => Enumerable.Range(2, VbLoraMethod.MaxVectors - 1).Select(h =>
                new VbLoraMethod { R = 4, TopK = 2, NumVectors = h, VectorLength = VectorLength(c), TargetModules = All })),
        new("xgblora", "xgblora", "boosters merged every steps/10 steps, l2 1e-4, shrinkage 1; the smallest rank whose layers-per-round × rank fits (the count is one round's boosters)",
            (c, x) => Enumerable.Range(1, XgbLoraMethod.MaxRank).SelectMany(rank => Enumerable.Range(1, c.NumHiddenLayers).Reverse().Select(layers =>
                new XgbLoraMethod { Rank = rank, LayersPerRound = layers, StepsPerRound = Math.Max(1, x.Steps / 10), Alpha = rank, TargetModules = All }))),
    ];

    /// <summary>The budget: bone r on all 7 linears (the Bone paper pairs LoRA r = 32 with bone r = 64: equal counts
    /// on square modules).</summary>
    public static long Budget(ModelConfig config, int boneR) => new BoneMethod { R = boneR, TargetModules = All }.TotalTrainableParameters(config);

    /// <summary>The paper's bone r = 64 on 4096-wide models, kept to a power of two at most hidden/8 on small ones so the
    /// adapter is not a sliver of them (tiny: 16, small: 32, 1b: 64).</summary>
    public static int DefaultBoneR(ModelConfig config)
    {
        var r = 64;
        while (r > 2 && r > config.HiddenSize / 8) r /= 2;
        return r;
    }

    public static ComparePlan Plan(CompareVariant variant, ModelConfig config, long budget, CompareContext context)
    {
        if (!MethodSpec.KnownTypes.Contains(variant.Type))
            return new ComparePlan(variant, null, 0, $"method '{variant.Type}' is not registered in this build");
        var shapes = config.LayerLinears();
        MethodSpec? best = null;
        long bestCount = 0;
        foreach (var spec in variant.Candidates(config, context))
        {
            if (spec.Validate().Any() || spec.ValidateShapes(shapes).Any()) continue;
            var count = spec.TotalTrainableParameters(config);
            if (best is null || Math.Abs(count - budget) < Math.Abs(bestCount - budget)) (best, bestCount) = (spec, count);
        }
        if (best is null) return new ComparePlan(variant, null, 0, "no option of this method fits the model's module shapes");
        // E.g. Bat on a model whose sizes share no large divisor: only a far smaller r would fit, which compares nothing.
        if (Math.Abs(bestCount - budget) > budget * MaxMismatch)
            return new ComparePlan(variant, null, bestCount,
                $"its closest option ({Describe(best)}: {bestCount:N0}, {CompareCommand.Relative(bestCount, budget)}) is more than {MaxMismatch * 100:0} % off the budget");
        if (!Training.Methods.AdapterMethods.IsSupported(best))
            return new ComparePlan(variant, null, 0, $"method '{variant.Type}' has options but no worker layer in this build");
        return new ComparePlan(variant, best, bestCount, null);
    }

    /// <summary>Registered methods no variant covers: listed as skipped, so a new method shows up in the report.</summary>
    public static IEnumerable<string> Uncovered() => MethodSpec.KnownTypes.Except(Variants.Select(v => v.Type));

    /// <summary>The options of a fitted method as a short text (the non-default values that matter).</summary>
    public static string Describe(MethodSpec spec) => spec switch
    {
        LoraMethod l => $"r={l.R}, alpha={l.Alpha:0.##}" + (l.Init != LoraFamilyMethod.InitDefault ? $", init={l.Init}" : "") +
                        (l.LoraPlusRatio is { } k ? $", loraPlusRatio={k:0.##}" : ""),
        DoraMethod d => $"r={d.R}, alpha={d.Alpha:0.##}",
        BoneMethod b => $"r={b.R}" + (b.Mini ? $", mini {b.MiniR}" : ""),
        BatMethod b => $"r={b.R}, {b.Grouping}",
        SboraMethod s => $"{s.Variant}, r={s.R}, alpha={s.Alpha:0.##}",
        VbLoraMethod v => $"r={v.R}, numVectors={v.NumVectors}, vectorLength={v.VectorLength}, topK={v.TopK}",
        XgbLoraMethod x => $"rank={x.Rank}, layersPerRound={x.LayersPerRound}, stepsPerRound={x.StepsPerRound}",
        _ => spec.Type,
    };

    private static IEnumerable<int> Ranks(ModelConfig c) =>
        Enumerable.Range(1, Math.Min(4096, c.LayerLinears().Max(m => Math.Max(m.In, m.Out))));

    /// <summary>VB-LoRA's b: the paper's 256 where it divides every module size, else the largest power of two that does.</summary>
    private static int VectorLength(ModelConfig c)
    {
        var sizes = c.LayerLinears().SelectMany(m => new[] { m.In, m.Out }).ToArray();
        var b = 256;
        while (b > 1 && sizes.Any(s => s % b != 0)) b /= 2;
        return b;
    }
}
