using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods;

/// <summary>
/// An adapter method attached to a model (PEFT "tuner" style): it owns one <see cref="IAdapterLayer"/> per targeted
/// linear module and knows the method's PEFT names and file format. Created by <see cref="AdapterMethods.Attach"/>.
/// </summary>
public interface IAdapterMethod : IDisposable
{
    MethodSpec Spec { get; }
    /// <summary>Adapter layers by HF module path (model.layers.N.self_attn.q_proj).</summary>
    IReadOnlyDictionary<string, IAdapterLayer> Layers { get; }
    /// <summary>Trainable tensors with their PEFT names (base_model.model.&lt;path&gt;.&lt;suffix&gt;, or base_model.&lt;name&gt; for a
    /// method-level tensor such as VB-LoRA's shared vector bank), in a fixed order.</summary>
    IReadOnlyList<(string Name, Tensor Tensor)> TrainableTensors { get; }
    /// <summary>Frozen tensors that are part of the adapter (SBoRA's index sets), with their names: saved beside the
    /// trainable ones in the native form and in checkpoints, and restored by <see cref="LoadTrainable"/>.</summary>
    IReadOnlyList<(string Name, Tensor Tensor)> FrozenTensors { get; }
    /// <summary>Optimizer parameter groups (one per distinct learning rate / decay).</summary>
    IReadOnlyList<ParamGroup> ParamGroups(Hyperparameters hyper);
    long TrainableParameterCount { get; }
    /// <summary>ΔW (out, in) in fp32 for one module: the change this adapter makes to W.</summary>
    Tensor DeltaWeight(string modulePath);
    /// <summary>W ← W + ΔW on every adapted module; forward then skips the adapter path.</summary>
    void Merge();
    /// <summary>W ← W − ΔW: undoes <see cref="Merge"/>.</summary>
    void Unmerge();
    bool Merged { get; }
    /// <summary>Dropout on (training) or off (evaluation).</summary>
    void Train(bool on = true);
    /// <summary>Copies trainable (and frozen) values in by name; every one must be present with its shape.</summary>
    void LoadTrainable(IReadOnlyDictionary<string, Tensor> tensors);
    /// <summary>Writes the native PEFT form (adapter_model.safetensors + adapter_config.json) and any portable
    /// exports (e.g. <c>lora/</c>) into <paramref name="dir"/>; returns the files written, relative to it.</summary>
    IReadOnlyList<string> Save(string dir, string baseModelName);
    /// <summary>Loads adapter_model.safetensors from a folder written by <see cref="Save"/>.</summary>
    void Load(string dir);

    // Training-loop hooks, in the order the trainer calls them for one optimizer step. Most methods need none
    // (AdapterMethodBase implements them as no-ops); VB-LoRA and XGBLoRA use them.

    /// <summary>Before the micro-batches of optimizer step <paramref name="step"/> (0-based).</summary>
    void BeginStep(long step);
    /// <summary>Before micro-batch <paramref name="index"/> of step <paramref name="step"/>: gives each layer the seed of
    /// its dropout mask, a function of (job seed, step, micro-batch, layer) only.</summary>
    void BeginMicroBatch(long step, int index);
    /// <summary>A regularisation term added once per optimizer step (its backward runs after the micro-batches'); null if none.</summary>
    Tensor? Penalty();
    /// <summary>After every micro-batch's backward and the penalty's, before gradient clipping and the optimizer step.</summary>
    void EndBackward();
    /// <summary>After the optimizer step <paramref name="step"/> (0-based) has been applied.</summary>
    void AfterOptimizerStep(long step, AdamW optimizer);

    /// <summary>State besides the trainable tensors that a resumed run needs to continue exactly (XGBLoRA: the merged
    /// boosters and the rounds' layer subsets), by key; empty for most methods. The tensors are new: the caller disposes them.</summary>
    IReadOnlyDictionary<string, Tensor> MethodState();
    /// <summary>Restores <see cref="MethodState"/> after the trainable tensors and the optimizer state were loaded.</summary>
    void LoadMethodState(IReadOnlyDictionary<string, Tensor> state);

    /// <summary>What the last <see cref="Save"/> wrote as portable exports (e.g. <c>lora/</c>: rank, exact or the SVD
    /// error per module), for the adapter's metadata.json; null when the method wrote none.</summary>
    JsonObject? ExportInfo { get; }
}

/// <summary>One adapter on one linear module.</summary>
public interface IAdapterLayer : ILinearAdapter, IDisposable
{
    Linear Base { get; }
    /// <summary>Trainable tensors by PEFT suffix (lora_A.weight, miss_block, …).</summary>
    IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors { get; }
    /// <summary>Frozen adapter state by suffix (SBoRA's <c>sbora_idx</c>); most methods have none.</summary>
    IReadOnlyList<(string Suffix, Tensor Tensor)> Frozen => [];
    Tensor DeltaWeight();
    bool Merged { get; set; }
    bool Training { get; set; }
    /// <summary>Seed of this layer's dropout mask for the current micro-batch (<see cref="IAdapterMethod.BeginMicroBatch"/>);
    /// layers without dropout ignore it.</summary>
    long DropoutSeed { get => 0; set { } }
    /// <summary><c>adapterDtype: mixed</c>: the layer's math runs in its input's dtype (the base's) over fp32 tensors,
    /// each cast for its product, so their gradients come back in fp32 through the casts (torch.autocast's arithmetic).
    /// Layers whose method does not support it ignore it (submission refuses the combination).</summary>
    bool Mixed { get; set; }
}

/// <summary>The methods the worker can train, keyed by their <see cref="MethodSpec"/> type.</summary>
public static class AdapterMethods
{
    private static readonly Dictionary<Type, Func<MethodSpec, IAdapterMethod>> Factories = new()
    {
        [typeof(LoraMethod)] = s => new Lora.LoraAdapter((LoraMethod)s),
        [typeof(BoneMethod)] = s => new Bone.BoneAdapter((BoneMethod)s),
        [typeof(DoraMethod)] = s => new Dora.DoraAdapter((DoraMethod)s),
        [typeof(BatMethod)] = s => new Bat.BatAdapter((BatMethod)s),
        [typeof(SboraMethod)] = s => new SBoRA.SboraAdapter((SboraMethod)s),
        [typeof(VbLoraMethod)] = s => new VBLoRA.VbLoraAdapter((VbLoraMethod)s),
        [typeof(XgbLoraMethod)] = s => new XGBLoRA.XgbLoraAdapter((XgbLoraMethod)s),
    };

    public static bool IsSupported(MethodSpec spec) => Factories.ContainsKey(spec.GetType());

    /// <summary>Injects the method's layers into the targeted linears of every decoder layer; init drawn from <paramref name="seed"/>.</summary>
    public static IAdapterMethod Attach(MethodSpec spec, Llama model, long seed)
    {
        if (!Factories.TryGetValue(spec.GetType(), out var factory))
            throw new NotSupportedException($"method '{spec.Type}' is not supported by this worker");
        var errors = spec.Validate().Concat(spec.ValidateShapes(model.Config.LayerLinears())).ToList();
        if (errors.Count > 0)
            throw new ArgumentException(string.Join("; ", errors.Select(e => $"{e.Field}: {e.Error}")));
        var method = (AdapterMethodBase)factory(spec);
        try { method.Attach(model, seed); }
        catch { method.Dispose(); throw; }
        return method;
    }
}

/// <summary>What all methods share: attach, naming, merge, save/load. A method adds its layer and its config JSON.</summary>
public abstract class AdapterMethodBase(MethodSpec spec) : IAdapterMethod
{
    public const string Prefix = "base_model.model.";
    private readonly Dictionary<string, IAdapterLayer> _layers = [];
    private readonly List<(string, Tensor)> _trainable = [];
    private readonly List<(string, Tensor)> _frozen = [];
    private readonly List<Tensor> _methodTensors = [];

    public MethodSpec Spec { get; } = spec;
    public IReadOnlyDictionary<string, IAdapterLayer> Layers => _layers;
    public IReadOnlyList<(string Name, Tensor Tensor)> TrainableTensors => _trainable;
    public IReadOnlyList<(string Name, Tensor Tensor)> FrozenTensors => _frozen;
    public long TrainableParameterCount => _trainable.Sum(t => t.Item2.NumEl);
    public bool Merged { get; private set; }

    /// <summary>The job's seed, as given to <see cref="AdapterMethods.Attach"/>.</summary>
    protected long Seed { get; private set; }

    protected abstract IAdapterLayer CreateLayer(Linear linear, Generator gen);
    /// <summary>Trainable tensors the method itself owns (not one module's: VB-LoRA's shared vector bank, XGBLoRA's
    /// booster slots), with their names; created before the layers, listed first, disposed by the base.</summary>
    protected virtual IReadOnlyList<(string Name, Tensor Tensor)> CreateMethodTensors(Llama model, Generator gen) => [];
    /// <summary>After every layer is attached.</summary>
    protected virtual void OnAttached(Llama model) { }
    /// <summary>The tensors of adapter_model.safetensors (default: the trainable and frozen tensors). Tensors created here are
    /// freed after the save (it runs in a dispose scope).</summary>
    protected virtual IReadOnlyDictionary<string, Tensor> NativeTensors() => _trainable.Concat(_frozen).ToDictionary(t => t.Item1, t => t.Item2);
    /// <summary>Reads the tensors of adapter_model.safetensors back (default: <see cref="LoadTrainable"/>).</summary>
    protected virtual void LoadNative(IReadOnlyDictionary<string, Tensor> tensors) => LoadTrainable(tensors);
    /// <summary>Frees what the method holds besides layers and method tensors.</summary>
    protected virtual void DisposeState() { }
    /// <summary>adapter_config.json of the native form.</summary>
    protected abstract JsonObject AdapterConfig(string baseModelName);
    /// <summary>Extra portable forms (e.g. a LoRA export); returns files written, relative to <paramref name="dir"/>.
    /// Set <see cref="ExportInfo"/> to describe them (usually the result of <see cref="LoraExport.Write"/>).</summary>
    protected virtual IReadOnlyList<string> SaveExports(string dir, string baseModelName) => [];

    public JsonObject? ExportInfo { get; protected set; }

    public virtual void BeginStep(long step) { }

    public void BeginMicroBatch(long step, int index)
    {
        var micro = (ulong)Trainer.StepSeed(Seed, step) ^ ((ulong)index * 0x9E3779B97F4A7C15UL);
        var layer = 0UL;
        foreach (var l in _layers.Values)
        {
            var s = micro ^ (++layer * 0xBF58476D1CE4E5B9UL);
            l.DropoutSeed = (long)(Data.TrainingData.SplitMix64(ref s) >> 1);
        }
    }
    public virtual Tensor? Penalty() => null;
    public virtual void EndBackward() { }
    public virtual void AfterOptimizerStep(long step, AdamW optimizer) { }
    public virtual IReadOnlyDictionary<string, Tensor> MethodState() => new Dictionary<string, Tensor>();
    public virtual void LoadMethodState(IReadOnlyDictionary<string, Tensor> state) { }

    internal void Attach(Llama model, long seed)
    {
        // Adapter init is drawn on the CPU from the job's seed, so it is the same on every device.
        Seed = seed;
        using var gen = new Generator(seed);
        foreach (var (name, t) in CreateMethodTensors(model, gen))
        {
            _methodTensors.Add(t);
            _trainable.Add((name, t));
        }
        for (var l = 0; l < model.Config.NumHiddenLayers; l++)
            foreach (var name in MethodSpec.AllModules.Where(Spec.TargetModules.Contains))
            {
                var path = ModelConfig.ModulePath(l, name);
                var linear = model.LinearAt(path);
                if (linear.Adapter is not null) throw new InvalidOperationException($"module '{path}' already has an adapter");
                var layer = CreateLayer(linear, gen);
                _layers[path] = layer;
                linear.Adapter = layer;
                foreach (var (suffix, t) in layer.Tensors) _trainable.Add(($"{Prefix}{path}.{suffix}", t));
                foreach (var (suffix, t) in layer.Frozen) _frozen.Add(($"{Prefix}{path}.{suffix}", t));
            }
        OnAttached(model);
    }

    public virtual IReadOnlyList<ParamGroup> ParamGroups(Hyperparameters hyper) =>
        [new ParamGroup("adapter", _trainable.Select(t => t.Item2).ToList(), hyper.LearningRate, hyper.WeightDecay)];

    public Tensor DeltaWeight(string modulePath) =>
        _layers.TryGetValue(modulePath, out var layer) ? layer.DeltaWeight()
            : throw new ArgumentException($"module '{modulePath}' has no adapter");

    public void Merge()
    {
        if (Merged) return;
        ApplyDelta(+1);
        Merged = true;
    }

    public void Unmerge()
    {
        if (!Merged) return;
        ApplyDelta(-1);
        Merged = false;
    }

    private void ApplyDelta(double sign)
    {
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var layer in _layers.Values)
        {
            using var scope = DisposeScope.Begin();
            var w = layer.Base.Weight;
            // In fp32, then cast back once, so a bf16 base loses as little as possible.
            w.Copy_(MergedWeight(layer, w.To(ScalarType.Float32), merge: sign > 0).To(w.DType));
            layer.Merged = sign > 0;
        }
    }

    /// <summary>The layer's base weight (fp32) after merging (W + ΔW) or unmerging (W' − ΔW). A method whose ΔW depends on
    /// W (Bat) overrides this with its own inverse.</summary>
    protected virtual Tensor MergedWeight(IAdapterLayer layer, Tensor weight, bool merge) =>
        weight.Add(layer.DeltaWeight(), merge ? 1 : -1);

    public void Train(bool on = true)
    {
        foreach (var layer in _layers.Values) layer.Training = on;
    }

    public void LoadTrainable(IReadOnlyDictionary<string, Tensor> tensors)
    {
        var all = _trainable.Concat(_frozen).ToList();
        var missing = all.Where(t => !tensors.ContainsKey(t.Item1)).Select(t => t.Item1).ToList();
        if (missing.Count > 0)
            throw new InvalidDataException($"adapter tensors missing: {string.Join(", ", missing.Take(5))}" +
                                           (missing.Count > 5 ? $" (+{missing.Count - 5} more)" : ""));
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var (name, t) in all)
        {
            var src = tensors[name];
            if (!src.Shape.SequenceEqual(t.Shape))
                throw new InvalidDataException(
                    $"adapter tensor '{name}' has shape ({string.Join(", ", src.Shape)}), expected ({string.Join(", ", t.Shape)})");
            using var scope = DisposeScope.Begin();
            t.Copy_(src.To(t.Device, t.DType));
        }
        AfterLoad();
    }

    /// <summary>Checks (or derives state from) values just loaded; throws <see cref="InvalidDataException"/> for bad ones.</summary>
    protected virtual void AfterLoad() { }

    public IReadOnlyList<string> Save(string dir, string baseModelName)
    {
        Directory.CreateDirectory(dir);
        using (DisposeScope.Begin())
        using (Torch.Torch.NoGrad())
            Safetensors.Save(Path.Combine(dir, AdapterFiles.Weights), NativeTensors(), new Dictionary<string, string> { ["format"] = "pt" });
        AdapterFiles.WriteJson(Path.Combine(dir, AdapterFiles.Config), AdapterConfig(baseModelName));
        return [AdapterFiles.Weights, AdapterFiles.Config, .. SaveExports(dir, baseModelName)];
    }

    public void Load(string dir)
    {
        var device = _trainable.Count > 0 ? _trainable[0].Item2.Device : Device.Cpu;
        var tensors = Safetensors.Load(Path.Combine(dir, AdapterFiles.Weights), device);
        try { LoadNative(tensors); }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
    }

    /// <summary>The PEFT target_modules list, in HF module order.</summary>
    protected string[] TargetModules => MethodSpec.AllModules.Where(Spec.TargetModules.Contains).ToArray();

    public void Dispose()
    {
        foreach (var layer in _layers.Values)
        {
            if (ReferenceEquals(layer.Base.Adapter, layer)) layer.Base.Adapter = null;
            layer.Dispose();
        }
        _layers.Clear();
        foreach (var t in _methodTensors) t.Dispose();
        _methodTensors.Clear();
        _trainable.Clear();
        _frozen.Clear();
        DisposeState();
        GC.SuppressFinalize(this);
    }
}

public static class AdapterFiles
{
    public const string Weights = "adapter_model.safetensors";
    public const string Config = "adapter_config.json";

    /// <summary>Writes JSON to a temporary name and renames it into place.</summary>
    public static void WriteJson(string path, JsonNode node)
    {
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, node.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>adapter_config.json fields PEFT expects of every adapter type.</summary>
    public static JsonObject CommonConfig(string peftType, string baseModelName, string[] targetModules) => new()
    {
        ["peft_type"] = peftType,
        ["task_type"] = "CAUSAL_LM",
        ["base_model_name_or_path"] = baseModelName,
        ["revision"] = null,
        ["inference_mode"] = true,
        ["target_modules"] = new JsonArray(targetModules.Select(m => (JsonNode)m).ToArray()),
        ["bias"] = "none",
        ["modules_to_save"] = null,
        ["layers_to_transform"] = null,
        ["layers_pattern"] = null,
    };
}
