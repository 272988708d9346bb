using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// Bone (PEFT: MiSS, default mode): one zero-initialised block D (r, out) shared by the input's r-sized chunks:
/// Δy = (Σ_k x[.., k·r:(k+1)·r]) D. If in % r ≠ 0 the input is zero-padded to the next multiple of r.
/// </summary>
[Description("Block-affine adaptation (PEFT MiSS): one block D (r, out) shared by the input's r-chunks")]
public sealed record BoneMethod : MethodSpec
{
    [JsonIgnore] public override string Type => "bone";
    /// <summary>Block size r (the paper's b).</summary>
    [DefaultValue(64)] public int R { get; init; } = 64;

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes).Where(m => R > m.In))
            yield return ($"{prefix}.r", $"r={R} exceeds the input size of module {m.Name} with shape ({m.Out}, {m.In})");
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * m.Out;
}
