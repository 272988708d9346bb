using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.XGBLoRA;

/// <summary>
/// XGBLoRA on one linear: the boosters merged so far, as fp32 factors <see cref="MergedA"/> (R, in) and
/// <see cref="MergedB"/> (out, R) with shrinkage·s folded into B (their ΔW is B·A), and the current round's booster
/// (one of the method's slots) when this module's layer is in the round's subset:
/// y = base + [x·MergedAᵀ·MergedBᵀ unless the merged boosters are in W] + s·(x Aᵀ) Bᵀ.
/// </summary>
public sealed class XgbLoraLayer : IAdapterLayer
{
    public Linear Base { get; }
    public double Scaling { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public bool Mixed { get; set; }
    /// <summary>XGBLoRA's trainable tensors are the method's booster slots, not the layers'.</summary>
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [];

    public Tensor? MergedA { get; private set; }
    public Tensor? MergedB { get; private set; }
    /// <summary>Number of booster ranks merged into this module (boosters × rank).</summary>
    public long MergedRank => MergedA?.Size(0) ?? 0;
    /// <summary>True: the merged boosters were added to W (fp32 base); false: they are applied in forward.</summary>
    public bool MergedInBase { get; internal set; }
    /// <summary>The current round's booster, or null when this module's layer sits the round out.</summary>
    public (Tensor A, Tensor B)? Booster { get; internal set; }

    public XgbLoraLayer(Linear linear, double scaling) => (Base, Scaling) = (linear, scaling);

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        var pending = !MergedInBase && MergedA is not null;
        if (!pending && Booster is null) return baseOutput;
        if (Mixed && x.DType != ScalarType.Float32 && baseOutput.DType == x.DType)
        {
            // The boosters' products in x's dtype over their fp32 tensors (merged ones frozen, the current one trained).
            var ym = baseOutput;
            if (pending) ym = ym + AdapterInput.LowRank(x, MergedA!, MergedB!);
            if (Booster is { } bm) ym = ym.Add(AdapterInput.LowRank(x, bm.A, bm.B), Scaling);
            return ym;
        }
        var h = AdapterInput.As(x, ScalarType.Float32);   // one cast per input shared by several modules
        Tensor? delta = pending ? F.Linear(F.Linear(h, MergedA!), MergedB!) : null;
        if (Booster is { } b)
        {
            var boosted = AdapterInput.ScaledLowRank(h, b.A, b.B, Scaling);
            delta = delta is null ? boosted : delta + boosted;
        }
        return AdapterInput.AddInto(baseOutput, delta!);
    }

    /// <summary>What this adapter adds to W now: the merged boosters not yet in W plus the current booster.</summary>
    public Tensor DeltaWeight()
    {
        using var scope = DisposeScope.Begin();
        var d = Tensor.Zeros([Base.OutFeatures, Base.InFeatures], ScalarType.Float32, Base.Weight.Device);
        if (!MergedInBase && MergedA is not null) d = d + MergedB!.MatMul(MergedA);
        if (Booster is { } b) d = d + b.B.MatMul(b.A) * Scaling;
        return d.MoveToOuterScope();
    }

    /// <summary>The whole adapter relative to the original W (merged boosters and the current one, if it was trained):
    /// A (R', in), B (out, R'), ΔW = B·A; R' may be 0.</summary>
    public (Tensor A, Tensor B) AllFactors(bool withBooster)
    {
        using var scope = DisposeScope.Begin();
        var a = MergedA ?? Tensor.Zeros([0, Base.InFeatures], ScalarType.Float32, Base.Weight.Device);
        var b = MergedB ?? Tensor.Zeros([Base.OutFeatures, 0], ScalarType.Float32, Base.Weight.Device);
        if (withBooster && Booster is { } bo)
        {
            a = Tensor.Cat([a, bo.A.Detach()], 0);
            b = Tensor.Cat([b, bo.B.Detach() * Scaling], 1);
        }
        return (a.Detach().MoveToOuterScope(), b.Detach().MoveToOuterScope());
    }

    /// <summary>Appends one merged booster (a (rank, in), b (out, rank), weight folded in); into W too when
    /// <see cref="MergedInBase"/>: in fp32, then cast back once.</summary>
    internal void Append(Tensor a, Tensor b)
    {
        using var noGrad = Torch.Torch.NoGrad();
        using (DisposeScope.Begin())
        {
            if (MergedInBase)
            {
                var w = Base.Weight;
                w.Copy_(w.To(ScalarType.Float32).Add(b.MatMul(a)).To(w.DType));
            }
            var newA = DisposeScope.Keep(MergedA is null ? a.Contiguous().Clone() : Tensor.Cat([MergedA, a], 0));
            var newB = DisposeScope.Keep(MergedB is null ? b.Contiguous().Clone() : Tensor.Cat([MergedB, b], 1));
            MergedA?.Dispose();
            MergedB?.Dispose();
            (MergedA, MergedB) = (newA, newB);
        }
    }

    public void Dispose()
    {
        MergedA?.Dispose();
        MergedB?.Dispose();
    }
}

/// <summary>
/// XGBLoRA (arXiv 2410.19694). Rounds of <c>stepsPerRound</c> (κ) optimizer steps; round t draws L_s of the model's
/// decoder layers from (job seed, t) (<see cref="RoundLayers"/>), binds one booster slot (A (rank, in) kaiming-uniform
/// like nn.Linear, B (out, rank) zero) to each targeted module of those layers, and at its end merges every booster
/// (W += shrinkage·s·B·A), re-initialises the slots on the next round's layers and resets their AdamW state. The loss
/// adds λ(‖A‖² + ‖B‖²) (<see cref="Penalty"/>). Only the slots (L_s × modules boosters) are trainable: the memory and
/// optimizer state of one rank-`rank` LoRA on L_s layers.
///
/// Precision: a tiny booster added to a bf16 weight is mostly rounded away, so training would go on from a W that does
/// not contain what the artifact records. So boosters go into W only when W is fp32 (exact up to fp32 rounding);
/// on a bf16/fp16 base W is never touched and the merged boosters stay fp32 factors applied in forward (a frozen
/// LoRA whose rank grows by `rank` per round that touches the module: no gradients, no optimizer state). Either
/// way every merged booster is kept as fp32 factors: they are the artifact, the checkpoint's method state, and what a
/// resumed run re-merges (booster by booster, in order: the same fp32 operations, so the same W bits).
/// </summary>
public sealed class XgbLoraAdapter(XgbLoraMethod spec) : AdapterMethodBase(spec)
{
    private readonly List<Slot> _slots = [];
    private readonly List<int[]> _rounds = [];
    private int _numLayers, _layersPerRound;
    private bool _mergeIntoBase = true;

    public XgbLoraMethod Xgb { get; } = spec;

    /// <summary>One trainable booster: slot <paramref name="Index"/> of the round's layer subset, module <paramref name="Module"/>.</summary>
    private sealed record Slot(int Index, string Module, Tensor A, Tensor B);

    /// <summary>The layers of every round so far (rounds 0..<see cref="Round"/>), ascending within a round.</summary>
    public IReadOnlyList<int[]> Rounds => _rounds;
    public int Round => _rounds.Count - 1;
    public int LayersPerRound => _layersPerRound;

    /// <summary>Whether boosters are added to W at the end of their round (default: when the base is fp32, see the class
    /// notes). May only change before the first merge.</summary>
    public bool MergeIntoBase
    {
        get => _mergeIntoBase;
        set
        {
            if (XgbLayers.Any(l => l.MergedRank > 0)) throw new InvalidOperationException("boosters were merged already");
            _mergeIntoBase = value;
            foreach (var l in XgbLayers) l.MergedInBase = value;
        }
    }

    private IEnumerable<XgbLoraLayer> XgbLayers => Layers.Values.Cast<XgbLoraLayer>();

    /// <summary>The round's layers: a partial Fisher–Yates draw of <paramref name="count"/> of <paramref name="numLayers"/>
    /// from SplitMix64 over (seed, round), sorted. Pure C#: the same on every machine and libtorch version.</summary>
    public static int[] RoundLayers(long seed, long round, int numLayers, int count)
    {
        var order = Enumerable.Range(0, numLayers).ToArray();
        var state = (ulong)seed * 0xD1B54A32D192ED03UL ^ ((ulong)round + 1) * 0x9E3779B97F4A7C15UL;
        for (var i = 0; i < count; i++)
        {
            var j = i + (int)(TrainingData.SplitMix64(ref state) % (ulong)(numLayers - i));
            (order[i], order[j]) = (order[j], order[i]);
        }
        return order[..count].Order().ToArray();
    }

    private static long RoundSeed(long seed, long round)
    {
        var s = (ulong)seed ^ ((ulong)round + 0x51ED27UL) * 0xBF58476D1CE4E5B9UL;
        return (long)(TrainingData.SplitMix64(ref s) >> 1);
    }

    protected override IReadOnlyList<(string Name, Tensor Tensor)> CreateMethodTensors(Llama model, Generator gen)
    {
        _numLayers = model.Config.NumHiddenLayers;
        _layersPerRound = Math.Min(Xgb.LayersPerRound, _numLayers);
        var shapes = model.Config.LayerLinears().ToDictionary(m => m.Name);
        var named = new List<(string, Tensor)>();
        for (var j = 0; j < _layersPerRound; j++)
            foreach (var module in TargetModules)
            {
                var m = shapes[module];
                var a = LoraLayer.Owned(Tensor.Zeros([Xgb.Rank, m.In], ScalarType.Float32, model.Device));
                var b = LoraLayer.Owned(Tensor.Zeros([m.Out, Xgb.Rank], ScalarType.Float32, model.Device));
                _slots.Add(new Slot(j, module, a, b));
                named.Add(($"base_model.xgblora_booster.{j}.{module}.lora_A.weight", a));
                named.Add(($"base_model.xgblora_booster.{j}.{module}.lora_B.weight", b));
            }
        return named;
    }

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) => new XgbLoraLayer(linear, Xgb.Scaling);

    protected override void OnAttached(Llama model)
    {
        MergeIntoBase = XgbLayers.All(l => l.Base.Weight.DType == ScalarType.Float32);
        StartRound(0, null);
    }

    private XgbLoraLayer LayerOf(int layer, string module) => (XgbLoraLayer)Layers[ModelConfig.ModulePath(layer, module)];

    /// <summary>Binds the slots to round <paramref name="round"/>'s layers; with <paramref name="init"/>, draws A, zeroes B
    /// and resets their AdamW state.</summary>
    private void StartRound(int round, AdamW? optimizer, bool init = true, int[]? layers = null)
    {
        layers ??= RoundLayers(Seed, round, _numLayers, _layersPerRound);
        while (_rounds.Count > round) _rounds.RemoveAt(_rounds.Count - 1);
        _rounds.Add(layers);
        foreach (var l in XgbLayers) l.Booster = null;
        using var noGrad = Torch.Torch.NoGrad();
        using var gen = new Generator(RoundSeed(Seed, round));
        foreach (var slot in _slots)
        {
            if (init)
            {
                using var scope = DisposeScope.Begin();
                var bound = 1.0 / Math.Sqrt(slot.A.Size(1));
                slot.A.Copy_(Tensor.Empty(slot.A.Shape).Uniform_(-bound, bound, gen));
                slot.B.Zero_();
            }
            LayerOf(layers[slot.Index], slot.Module).Booster = (slot.A, slot.B);
        }
        if (init) optimizer?.ResetState(_slots.SelectMany(s => new[] { s.A, s.B }));
    }

    /// <summary>Merges the round's boosters with weight shrinkage·s.</summary>
    private void EndRound()
    {
        using var noGrad = Torch.Torch.NoGrad();
        var weight = Xgb.Shrinkage * Xgb.Scaling;
        foreach (var l in XgbLayers)
            if (l.Booster is { } b)
            {
                using var scope = DisposeScope.Begin();
                l.Append(b.A.Detach().Clone(), b.B * weight);
            }
    }

    public override Tensor? Penalty()
    {
        if (Xgb.L2 == 0) return null;
        Tensor? sum = null;
        foreach (var s in _slots)
        {
            var t = s.A.Square().Sum() + s.B.Square().Sum();
            sum = sum is null ? t : sum + t;
        }
        return sum is null ? null : sum * Xgb.L2;
    }

    public override void AfterOptimizerStep(long step, AdamW optimizer)
    {
        if ((step + 1) % Xgb.StepsPerRound != 0) return;
        EndRound();
        StartRound(Round + 1, optimizer);
    }

    /// <summary>"rounds" (rounds, L_s) Int64 and, per module with merged boosters, "&lt;path&gt;.A" and "&lt;path&gt;.B".</summary>
    public override IReadOnlyDictionary<string, Tensor> MethodState()
    {
        var d = new Dictionary<string, Tensor>
        {
            ["rounds"] = Tensor.From(_rounds.SelectMany(r => r.Select(x => (long)x)).ToArray(), _rounds.Count, _layersPerRound),
        };
        foreach (var (path, layer) in Layers)
            if (layer is XgbLoraLayer { MergedA: { } a, MergedB: { } b })
            {
                d[$"{path}.A"] = a.Detach();
                d[$"{path}.B"] = b.Detach();
            }
        return d;
    }

    /// <summary>Re-merges the checkpoint's boosters into the freshly loaded model and binds the slots (whose values and
    /// optimizer state were restored already) to the checkpoint's current round.</summary>
    public override void LoadMethodState(IReadOnlyDictionary<string, Tensor> state)
    {
        if (!state.TryGetValue("rounds", out var rounds) || rounds.Dim != 2 || rounds.Size(1) != _layersPerRound || rounds.Size(0) < 1)
            throw new InvalidDataException("XGBLoRA checkpoint state lacks a valid 'rounds' tensor");
        var flat = rounds.To(ScalarType.Int64).ToArray<long>();
        var list = Enumerable.Range(0, (int)rounds.Size(0))
            .Select(r => flat.Skip(r * _layersPerRound).Take(_layersPerRound).Select(x => (int)x).ToArray()).ToList();
        if (list.SelectMany(r => r).Any(x => x < 0 || x >= _numLayers))
            throw new InvalidDataException("XGBLoRA checkpoint state names a layer the model does not have");
        SetMerged(state, k => $"{k}.A", k => $"{k}.B");
        _rounds.Clear();
        _rounds.AddRange(list.Take(list.Count - 1));
        StartRound(list.Count - 1, null, init: false, layers: list[^1]);
    }

    /// <summary>Sets every module's merged boosters from <paramref name="tensors"/> (replaying the merges into W,
    /// booster by booster, when <see cref="MergeIntoBase"/>); only on a method that has merged nothing yet.</summary>
    private void SetMerged(IReadOnlyDictionary<string, Tensor> tensors, Func<string, string> aKey, Func<string, string> bKey)
    {
        if (XgbLayers.Any(l => l.MergedRank > 0))
            throw new InvalidOperationException("XGBLoRA boosters can only be loaded into a freshly attached adapter");
        foreach (var (path, layer) in Layers)
        {
            if (!tensors.TryGetValue(aKey(path), out var a)) continue;
            if (!tensors.TryGetValue(bKey(path), out var b)) throw new InvalidDataException($"'{aKey(path)}' has no '{bKey(path)}'");
            var x = (XgbLoraLayer)layer;
            var r = a.Size(0);
            if (a.Dim != 2 || b.Dim != 2 || a.Size(1) != x.Base.InFeatures || b.Size(0) != x.Base.OutFeatures || b.Size(1) != r || r % Xgb.Rank != 0)
                throw new InvalidDataException($"XGBLoRA factors of {path} have shapes ({string.Join(", ", a.Shape)}) and " +
                    $"({string.Join(", ", b.Shape)}); expected (k·{Xgb.Rank}, {x.Base.InFeatures}) and ({x.Base.OutFeatures}, k·{Xgb.Rank})");
            using var scope = DisposeScope.Begin();
            var device = x.Base.Weight.Device;
            for (long k = 0; k < r; k += Xgb.Rank)
                x.Append(a.Narrow(0, k, Xgb.Rank).To(device, ScalarType.Float32).Contiguous(),
                         b.Narrow(1, k, Xgb.Rank).To(device, ScalarType.Float32).Contiguous());
        }
    }

    /// <summary>Whether the current booster has been trained (B ≠ 0): then the artifact includes it.</summary>
    private bool BoosterTrained(XgbLoraLayer l)
    {
        if (l.Booster is not { } b) return false;
        using var scope = DisposeScope.Begin();
        return b.B.Abs().Max().ItemDouble() > 0;
    }

    private List<(string Path, Tensor A, Tensor B)> ArtifactFactors() =>
        Layers.Select(kv => (kv.Key, (XgbLoraLayer)kv.Value))
              .Select(p => { var (a, b) = p.Item2.AllFactors(BoosterTrained(p.Item2)); return (p.Key, a, b); })
              .ToList();

    /// <summary>Our native form: per module with boosters <c>…xgblora_A</c> (R, in) and <c>…xgblora_B</c> (out, R),
    /// ΔW = B·A against the original W with every weight folded in; <c>base_model.xgblora_rounds</c> (rounds, L_s) Int32.
    /// The unfinished round's booster is included as trained (weight s): the artifact is the model the training ended with.</summary>
    protected override IReadOnlyDictionary<string, Tensor> NativeTensors()
    {
        var d = new Dictionary<string, Tensor>
        {
            ["base_model.xgblora_rounds"] = Tensor.From(_rounds.SelectMany(r => r).ToArray(), _rounds.Count, _layersPerRound),
        };
        foreach (var (path, a, b) in ArtifactFactors().Where(f => f.A.Size(0) > 0))
        {
            d[$"{Prefix}{path}.xgblora_A"] = a.Contiguous();
            d[$"{Prefix}{path}.xgblora_B"] = b.Contiguous();
        }
        return d;
    }

    /// <summary>Loads the boosters of a saved adapter as merged boosters of this freshly attached one.</summary>
    protected override void LoadNative(IReadOnlyDictionary<string, Tensor> tensors) =>
        SetMerged(tensors, p => $"{Prefix}{p}.xgblora_A", p => $"{Prefix}{p}.xgblora_B");

    protected override JsonObject AdapterConfig(string baseModelName)
    {
        var c = AdapterFiles.CommonConfig("XGBLORA", baseModelName, TargetModules);
        c["format"] = "finetune-xgblora-v1: per module base_model.model.<path>.xgblora_A (R, in) and .xgblora_B (out, R), " +
                      "delta W = xgblora_B @ xgblora_A against the original weights (shrinkage and scale folded in), " +
                      "R = rank x boosters that touched the module; modules without tensors are unchanged; " +
                      "base_model.xgblora_rounds (rounds, layers_per_round) lists each round's decoder layers";
        c["rank"] = Xgb.Rank;
        c["lora_alpha"] = Xgb.Alpha;
        c["scaling"] = Xgb.Scaling;
        c["layers_per_round"] = _layersPerRound;
        c["steps_per_round"] = Xgb.StepsPerRound;
        c["l2"] = Xgb.L2;
        c["shrinkage"] = Xgb.Shrinkage;
        c["rounds"] = _rounds.Count;
        c["r"] = XgbLayers.Max(l => l.MergedRank + (BoosterTrained(l) ? Xgb.Rank : 0));
        return c;
    }

    /// <summary><c>lora/</c>: the boosters of each module concatenated (exact; zero-padded to the most-boosted module's
    /// rank), or with <c>exportRank</c> the SVD truncation of their sum where a module has more ranks than that.</summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.Torch.NoGrad();
        var modules = ArtifactFactors().Select(f => Xgb.ExportRank is { } rank && f.A.Size(0) > rank
            ? LoraExport.FromDelta(f.Path, f.B.MatMul(f.A), rank)
            : new LoraExport.Module(f.Path, f.A, f.B)).ToList();
        var rounds = _rounds.Count;
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info,
            note: $"sum of the XGBLoRA boosters of {rounds} round(s), rank {Xgb.Rank} each");
        ExportInfo = info;
        return files;
    }
}
