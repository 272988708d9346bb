using System.Text.Json.Serialization;
using FineTune.Domain.Models;

namespace FineTune.Domain.Methods;

/// <summary>
/// The adapter method of a job and its options: a discriminated union on <c>type</c>. Each method's options live in
/// one file beside this one; the worker's layer for it lives in <c>src/Worker/Training/Methods/&lt;Method&gt;/</c>.
/// Adding a method: one options record here, one <see cref="JsonDerivedTypeAttribute"/> line, one worker folder.
/// </summary>
[JsonPolymorphic(TypeDiscriminatorPropertyName = "type", UnknownDerivedTypeHandling = JsonUnknownDerivedTypeHandling.FailSerialization)]
[JsonDerivedType(typeof(LoraMethod), "lora")]
[JsonDerivedType(typeof(BoneMethod), "bone")]
[JsonDerivedType(typeof(DoraMethod), "dora")]
[JsonDerivedType(typeof(BatMethod), "bat")]
[JsonDerivedType(typeof(SboraMethod), "sbora")]
[JsonDerivedType(typeof(VbLoraMethod), "vblora")]
[JsonDerivedType(typeof(XgbLoraMethod), "xgblora")]
public abstract record MethodSpec
{
    /// <summary>Short module names to adapt (HF names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).</summary>
    public string[] TargetModules { get; init; } = ["q_proj", "v_proj"];

    [JsonIgnore] public abstract string Type { get; }

    /// <summary>The registered methods (the <see cref="JsonDerivedTypeAttribute"/> lines above): discriminator and options type.</summary>
    public static readonly IReadOnlyList<(string Type, Type OptionsType)> Registered =
        typeof(MethodSpec).GetCustomAttributes(typeof(JsonDerivedTypeAttribute), inherit: false).Cast<JsonDerivedTypeAttribute>()
            .Select(a => ((string)a.TypeDiscriminator!, a.DerivedType)).ToArray();

    public static readonly string[] KnownTypes = Registered.Select(r => r.Type).ToArray();

    /// <summary>A method's options with every default (the Swagger examples are these).</summary>
    public static MethodSpec Default(string type) =>
        (MethodSpec)Activator.CreateInstance(Registered.Single(r => r.Type == type).OptionsType)!;
    public static readonly string[] AllModules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>Option errors that need no model (ranges), keyed by JSON path.</summary>
    public virtual IEnumerable<(string Field, string Error)> Validate(string prefix = "method")
    {
        if (TargetModules is null || TargetModules.Length == 0)
            yield return ($"{prefix}.targetModules", "must name at least one module");
        else
        {
            if (TargetModules.Length > AllModules.Length) yield return ($"{prefix}.targetModules", "too many entries");
            foreach (var m in TargetModules.Where(m => !AllModules.Contains(m)))
                yield return ($"{prefix}.targetModules", $"unknown module '{m}'; known: {string.Join(", ", AllModules)}");
            if (TargetModules.Distinct().Count() != TargetModules.Length)
                yield return ($"{prefix}.targetModules", "lists a module twice");
        }
    }

    /// <summary>Errors against the model's module shapes (divisibility, rank bounds), naming the module and its shape.</summary>
    public virtual IEnumerable<(string Field, string Error)> ValidateShapes(IReadOnlyList<ModuleShape> layerLinears, string prefix = "method")
    {
        yield break;
    }

    /// <summary>Whether the method's layers compute with bf16 adapter tensors (<c>hyperparameters.adapterDtype: bf16</c>);
    /// the others train fp32 adapters only.</summary>
    [JsonIgnore] public virtual bool SupportsBf16Adapters => false;

    /// <summary>Whether the method's layers run their math in the base's dtype over fp32 adapter tensors
    /// (<c>hyperparameters.adapterDtype: mixed</c>): every method with bf16 adapters, and some that keep fp32 tensors.</summary>
    [JsonIgnore] public virtual bool SupportsMixedAdapters => SupportsBf16Adapters;

    /// <summary>The adapter precision a job of this method trains with: <c>auto</c> is mixed where the method supports
    /// it, else fp32; any other value is itself.</summary>
    public string EffectiveAdapterDtype(string requested) =>
        requested == Jobs.Hyperparameters.AutoAdapterDtype ? (SupportsMixedAdapters ? "mixed" : "fp32") : requested;

    /// <summary>Errors of the method together with the job's hyperparameters.</summary>
    public IEnumerable<(string Field, string Error)> ValidateWith(Jobs.Hyperparameters hyper, string prefix = "hyperparameters")
    {
        if (hyper.AdapterDtype == "bf16" && !SupportsBf16Adapters)
            yield return ($"{prefix}.adapterDtype",
                $"bf16 adapters are supported for {string.Join(", ", Registered.Where(r => Default(r.Type).SupportsBf16Adapters).Select(r => r.Type))}; method '{Type}' trains fp32 adapters");
        if (hyper.AdapterDtype == "mixed" && !SupportsMixedAdapters)
            yield return ($"{prefix}.adapterDtype",
                $"mixed precision is supported for {string.Join(", ", Registered.Where(r => Default(r.Type).SupportsMixedAdapters).Select(r => r.Type))}; method '{Type}' computes its adapters in fp32");
    }

    /// <summary>Trainable parameters this method adds to one module of shape (out, in).</summary>
    public abstract long TrainableParameters(ModuleShape module);

    /// <summary>Trainable parameters on a whole model: every decoder layer's targeted modules, plus whatever the method
    /// shares across modules (VB-LoRA's bank) or minus what it trains only part of the time (XGBLoRA's layer subsets).</summary>
    public virtual long TotalTrainableParameters(ModelConfig config) =>
        config.NumHiddenLayers * Targeted(config.LayerLinears()).Sum(TrainableParameters);

    protected IEnumerable<ModuleShape> Targeted(IReadOnlyList<ModuleShape> shapes) =>
        shapes.Where(s => TargetModules.Contains(s.Name));
}
