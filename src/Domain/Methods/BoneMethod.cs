using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// Bone (PEFT: MiSS): a zero-initialised block shared by the input's r-sized chunks: Δy = (Σ_k x[.., k·r:(k+1)·r]) D.
/// If in % r ≠ 0 the input is zero-padded to the next multiple of r. Mode <c>default</c>: D (r, out).
/// Mode <c>mini</c> (PEFT <c>init_weights="mini"</c>): D (r, miniR) repeated out/miniR times along out.
/// </summary>
[Description("Block-affine adaptation (PEFT MiSS): one block D (r, out) shared by the input's r-chunks; mode mini: D (r, miniR) repeated along out")]
public sealed record BoneMethod : MethodSpec
{
    public override bool SupportsBf16Adapters => true;

    public static readonly string[] Modes = ["default", "mini"];

    [JsonIgnore] public override string Type => "bone";
    /// <summary>Block size r (the paper's b).</summary>
    [DefaultValue(64)] public int R { get; init; } = 64;
    /// <summary><c>default</c>: D (r, out); <c>mini</c>: D (r, miniR) repeated along the output (fewer parameters).</summary>
    [DefaultValue("default")] public string Mode { get; init; } = "default";
    /// <summary>Output width of D in mode <c>mini</c>; must divide every targeted module's output size.</summary>
    [DefaultValue(1)] public int MiniR { get; init; } = 1;

    [JsonIgnore] public bool Mini => Mode == "mini";

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
        if (!Modes.Contains(Mode)) yield return ($"{prefix}.mode", $"must be one of: {string.Join(", ", Modes)}");
        if (MiniR is < 1 or > 65536) yield return ($"{prefix}.miniR", "must be between 1 and 65536");
        else if (!Mini && MiniR != 1) yield return ($"{prefix}.miniR", "applies only to mode 'mini'");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes))
        {
            if (R > m.In) yield return ($"{prefix}.r", $"r={R} exceeds the input size of module {m.Name} with shape ({m.Out}, {m.In})");
            if (Mini && m.Out % MiniR != 0)
                yield return ($"{prefix}.miniR", $"miniR={MiniR} does not divide the output size of module {m.Name} with shape ({m.Out}, {m.In})");
        }
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * (Mini ? MiniR : m.Out);
}
