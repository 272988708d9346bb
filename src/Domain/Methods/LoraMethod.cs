using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>LoRA: Δy = s·(x Aᵀ) Bᵀ with A (r, in) and B (out, r); s = alpha/r (rsLoRA: alpha/√r).</summary>
[Description("Low-rank adaptation: dy = s*(x A^T) B^T; the default, loaded by every serving stack")]
public sealed record LoraMethod : MethodSpec
{
    [JsonIgnore] public override string Type => "lora";
    /// <summary>Rank.</summary>
    [DefaultValue(8)] public int R { get; init; } = 8;
    /// <summary>Scaling numerator: s = alpha / r.</summary>
    [DefaultValue(16.0)] public double Alpha { get; init; } = 16;
    /// <summary>Dropout on the adapter's input.</summary>
    [DefaultValue(0.0)] public double Dropout { get; init; }
    /// <summary>rsLoRA scaling: s = alpha / √r.</summary>
    [DefaultValue(false)] public bool Rslora { get; init; }

    public double Scaling => Rslora ? Alpha / Math.Sqrt(R) : Alpha / R;

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
        if (!(Alpha > 0 && Alpha <= 1e6)) yield return ($"{prefix}.alpha", "must be > 0 and <= 1e6");
        if (!(Dropout >= 0 && Dropout < 1)) yield return ($"{prefix}.dropout", "must be in [0, 1)");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes).Where(m => R > Math.Min(m.In, m.Out)))
            yield return ($"{prefix}.r", $"r={R} exceeds min(out, in) of module {m.Name} with shape ({m.Out}, {m.In})");
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * (m.In + m.Out);
}
