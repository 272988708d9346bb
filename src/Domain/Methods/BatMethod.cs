using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// Bat (the Bone paper's "weight guide"; PEFT MiSS <c>init_weights="bat"</c>): W is cut into r×r blocks W_{o,a}
/// (o: output block, a: input block) and every block changes by an affine map of itself through a zero-initialised
/// trainable block. Grouping <c>col</c> (PEFT): D (out/r, r, r), W'_{o,a} = W_{o,a}(I + D_o) + D_o.
/// Grouping <c>row</c> (ours): D (in/r, r, r), W'_{o,a} = (I + D_a)W_{o,a} + D_a. Requires in % r = 0 and out % r = 0.
/// </summary>
[Description("Bat (PEFT MiSS bat): every r x r block of W changes by W_b D + D with a zero-initialised D per output block (col) or input block (row)")]
public sealed record BatMethod : MethodSpec
{
    public override bool SupportsBf16Adapters => true;

    public static readonly string[] Groupings = ["col", "row"];

    [JsonIgnore] public override string Type => "bat";
    /// <summary>Block size r; must divide every targeted module's input and output sizes.</summary>
    [DefaultValue(64)] public int R { get; init; } = 64;
    /// <summary><c>col</c>: one block D per output block (PEFT's bat, params out·r); <c>row</c>: one per input block (params in·r).</summary>
    [DefaultValue("col")] public string Grouping { get; init; } = "col";

    [JsonIgnore] public bool Row => Grouping == "row";

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
        if (!Groupings.Contains(Grouping)) yield return ($"{prefix}.grouping", $"must be one of: {string.Join(", ", Groupings)}");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes).Where(m => m.In % R != 0 || m.Out % R != 0))
            yield return ($"{prefix}.r", $"r={R} must divide both sizes of module {m.Name} with shape ({m.Out}, {m.In}) (Bat cuts W into r x r blocks)");
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * (Row ? m.In : m.Out);
}
