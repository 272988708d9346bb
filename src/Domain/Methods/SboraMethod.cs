using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// SBoRA (standard-basis LoRA): one LoRA factor is a frozen set of r standard basis vectors, drawn per module from the
/// job's seed and stored with the adapter. <c>fa</c>: r input indices, trainable B (out, r), Δy = s·x[.., idx]Bᵀ,
/// only the columns idx of W change. <c>fb</c>: r output indices, trainable A (r, in), Δy[.., idx] += s·xAᵀ, only the
/// rows idx change. s = alpha/r; the trainable factor starts at zero.
/// </summary>
[Description("Standard-basis LoRA: fa trains B (out, r) on r input columns chosen from the seed, fb trains A (r, in) on r output rows")]
public sealed record SboraMethod : MethodSpec
{
    public static readonly string[] Variants = ["fa", "fb"];

    [JsonIgnore] public override string Type => "sbora";
    /// <summary>fp32 tensors; with mixed, the layers' products run in the base's dtype.</summary>
    [JsonIgnore] public override bool SupportsMixedAdapters => true;
    /// <summary><c>fa</c>: frozen one-hot A, trainable B (changes r columns of W); <c>fb</c>: frozen one-hot B, trainable A (r rows).</summary>
    [DefaultValue("fa")] public string Variant { get; init; } = "fa";
    /// <summary>Number of standard basis vectors (columns for fa, rows for fb).</summary>
    [DefaultValue(32)] public int R { get; init; } = 32;
    /// <summary>Scaling numerator: s = alpha / r.</summary>
    [DefaultValue(64.0)] public double Alpha { get; init; } = 64;
    /// <summary>Dropout on the adapter's input.</summary>
    [DefaultValue(0.05)] public double Dropout { get; init; } = 0.05;

    [JsonIgnore] public bool Fa => Variant == "fa";
    public double Scaling => Alpha / R;

    public override IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        foreach (var e in base.Validate(prefix)) yield return e;
        if (!Variants.Contains(Variant)) yield return ($"{prefix}.variant", $"must be one of: {string.Join(", ", Variants)}");
        if (R is < 1 or > 4096) yield return ($"{prefix}.r", "must be between 1 and 4096");
        if (!(Alpha > 0 && Alpha <= 1e6)) yield return ($"{prefix}.alpha", "must be > 0 and <= 1e6");
        if (!(Dropout >= 0 && Dropout < 1)) yield return ($"{prefix}.dropout", "must be in [0, 1)");
    }

    public override IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> shapes, string prefix = "method")
    {
        foreach (var m in Targeted(shapes))
        {
            if (Fa && R > m.In) yield return ($"{prefix}.r", $"r={R} exceeds the input size of module {m.Name} with shape ({m.Out}, {m.In}) (fa picks r distinct input columns)");
            if (!Fa && R > m.Out) yield return ($"{prefix}.r", $"r={R} exceeds the output size of module {m.Name} with shape ({m.Out}, {m.In}) (fb picks r distinct output rows)");
        }
    }

    public override long TrainableParameters(ModuleShape m) => (long)R * (Fa ? m.Out : m.In);
}
