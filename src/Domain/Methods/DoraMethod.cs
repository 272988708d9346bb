using System.Text.Json.Serialization;
using System.ComponentModel;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// DoRA (weight-decomposed LoRA, arXiv 2402.09353): a LoRA (A, B) for the direction plus a trainable magnitude
/// m (out), initialised to the row norms ‖W‖: W' = m · (W + s·B·A) / ‖W + s·B·A‖_row, the norm detached from the graph.
/// </summary>
[Description("Weight-decomposed LoRA: a LoRA for the direction plus a trainable per-row magnitude m (PEFT LORA with use_dora)")]
public sealed record DoraMethod : LoraFamilyMethod
{
    private static readonly string[] DoraInits = [InitDefault, InitGaussian];

    [JsonIgnore] public override string Type => "dora";
    /// <summary>fp32 A, B and magnitude; with mixed, the module's products run in the base's dtype.</summary>
    [JsonIgnore] public override bool SupportsMixedAdapters => true;
    [JsonIgnore] public override IReadOnlyList<string> Inits => DoraInits;

    /// <summary>LoRA's r·(in + out) plus the magnitude vector (out).</summary>
    public override long TrainableParameters(ModuleShape m) => base.TrainableParameters(m) + m.Out;
}
