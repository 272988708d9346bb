using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// The options LoRA and its variants share (rank, scaling, dropout, init, LoRA+): Δy = s·(x Aᵀ) Bᵀ with A (r, in),
/// B (out, r); s = alpha/r (rsLoRA: alpha/√r).
/// </summary>
public abstract record LoraFamilyMethod : MethodSpec
{
    public const string InitDefault = "default", InitGaussian = "gaussian", InitPissa = "pissa", InitOlora = "olora";

    /// <summary>Rank.</summary>
    [DefaultValue(8)] public int R { get; init; } = 8;
    /// <summary>Scaling numerator: s = alpha / r.</summary>
    [DefaultValue(16.0)] public double Alpha { get; init; } = 16;
    /// <summary>Dropout on the adapter's input.</summary>
    [DefaultValue(0.0)] public double Dropout { get; init; }
    /// <summary>rsLoRA scaling: s = alpha / √r.</summary>
    [DefaultValue(false)] public bool Rslora { get; init; }
    /// <summary>Initialisation of A and B: <c>default</c> (A kaiming-uniform, B = 0), <c>gaussian</c> (A ~ N(0, (1/r)²),
    /// B = 0); LoRA also <c>pissa</c> (A, B = the top-r singular triplets of W, W replaced by the residual) and
    /// <c>olora</c> (A, B from the QR decomposition of W, W replaced by the residual).</summary>
    [DefaultValue(InitDefault)] public string Init { get; init; } = InitDefault;
    /// <summary>LoRA+: B's learning rate is the job's learning rate times this ratio (the paper suggests 16);
    /// null leaves one learning rate for all adapter tensors.</summary>
    [DefaultValue(null)] public double? LoraPlusRatio { get; init; }

    public double Scaling => Rslora ? Alpha / Math.Sqrt(R) : Alpha / R;

    /// <summary>The values <see cref="Init"/> may take for this method.</summary>
    [JsonIgnore] public abstract IReadOnlyList<string> Inits { get; }

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
        if (!(Alpha > 0 && Alpha <= 1e6)) yield return ($"{prefix}.alpha", "must be > 0 and <= 1e6");
        if (!(Dropout >= 0 && Dropout < 1)) yield return ($"{prefix}.dropout", "must be in [0, 1)");
        if (Init is null || !Inits.Contains(Init))
            yield return ($"{prefix}.init", $"must be one of: {string.Join(", ", Inits)}");
        // PEFT's LoRA+ requires a ratio >= 1 (B learns faster than A); above 1000 the two rates no longer share a scale.
        if (LoraPlusRatio is { } ratio && !(ratio >= 1 && ratio <= 1000))
            yield return ($"{prefix}.loraPlusRatio", "must be between 1 and 1000 (or null for plain LoRA learning rates)");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes).Where(m => R > Math.Min(m.In, m.Out)))
            yield return ($"{prefix}.r", $"r={R} exceeds min(out, in) of module {m.Name} with shape ({m.Out}, {m.In})");
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * (m.In + m.Out);
}

/// <summary>LoRA: Δy = s·(x Aᵀ) Bᵀ with A (r, in) and B (out, r); s = alpha/r (rsLoRA: alpha/√r). With
/// <c>init: pissa|olora</c> the base weight is replaced by its residual W − s·B₀A₀; with <c>loraPlusRatio</c> B learns
/// faster (LoRA+).</summary>
[Description("Low-rank adaptation: dy = s*(x A^T) B^T; the default, loaded by every serving stack. init: default|gaussian|pissa|olora; loraPlusRatio: LoRA+")]
public sealed record LoraMethod : LoraFamilyMethod
{
    public override bool SupportsBf16Adapters => true;

    private static readonly string[] AllInits = [InitDefault, InitGaussian, InitPissa, InitOlora];

    [JsonIgnore] public override string Type => "lora";
    [JsonIgnore] public override IReadOnlyList<string> Inits => AllInits;

    /// <summary>PiSSA and OLoRA start from factors of W and train against the residual W − s·B₀A₀.</summary>
    [JsonIgnore] public bool ChangesBaseWeights => Init is InitPissa or InitOlora;
}
