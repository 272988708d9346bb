using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.VBLoRA;

/// <summary>
/// VB-LoRA on one linear (PEFT vblora.Linear): logits L_A (r, in/b, h) and L_B (out/b, r, h) select, per sub-vector of
/// length b, a softmax-weighted mixture of the top-k rows of the shared bank V (h, b):
/// A = mix(L_A).reshape(r, in), B = mix(L_B).transpose(1, 2).reshape(out, r), y = base + (dropout(x) Aᵀ) Bᵀ.
/// During a training step the method composes A and B once (<see cref="VbLoraAdapter.BeginStep"/>) and the layer reads
/// the step's leaf copies; at any other time (validation, evaluation, a direct forward) it composes on the fly.
/// </summary>
public sealed class VbLoraLayer : IAdapterLayer, IWholeLinearAdapter
{
    public Linear Base { get; }
    public Tensor LogitsA { get; }
    public Tensor LogitsB { get; }
    public Tensor Bank { get; }
    public int R { get; }
    public int TopK { get; }
    public double Dropout { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public long DropoutSeed { get; set; }
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [("vblora_logits_A", LogitsA), ("vblora_logits_B", LogitsB)];

    // The current step's composed factors: leaves (requires_grad) of shape (n, r, in) / (n, out, r) shared by the
    // modules of one shape, and this module's index in them. Null outside a training step.
    internal (Tensor A, int IndexA, Tensor B, int IndexB)? Step { get; set; }

    public VbLoraLayer(Linear linear, Tensor bank, int r, int topK, double dropout, double logitsStd, Generator gen)
    {
        (Base, Bank, R, TopK, Dropout) = (linear, bank, r, topK, dropout);
        var (h, b) = (bank.Size(0), bank.Size(1));
        var device = linear.Weight.Device;
        using var a = Tensor.Empty([r, linear.InFeatures / b, h]).Normal_(0, logitsStd, gen);
        using var bl = Tensor.Empty([linear.OutFeatures / b, r, h]).Normal_(0, logitsStd, gen);
        LogitsA = LoraLayer.Owned(a.To(device, ScalarType.Float32).Clone());
        LogitsB = LoraLayer.Owned(bl.To(device, ScalarType.Float32).Clone());
    }

    /// <summary>PEFT's _get_low_rank_matrix: the softmax over the k largest logits weights the matching bank rows.
    /// logits (..., h) → (..., b).</summary>
    public static Tensor Mix(Tensor logits, Tensor bank, int topK)
    {
        var (values, indices) = logits.TopK(topK, -1);
        var weights = values.Softmax(-1);
        var rows = bank.IndexSelect(0, indices.Flatten()).View([.. indices.Shape, bank.Size(1)]);
        return (weights.Unsqueeze(-1) * rows).Sum([-2]);
    }

    /// <summary>A (r, in) from logits (…, r, in/b, h); also works on a stack of modules (n, r, in/b, h) → (n, r, in).</summary>
    public static Tensor ComposeA(Tensor logitsA, Tensor bank, int topK)
    {
        var m = Mix(logitsA, bank, topK);                        // (…, r, in/b, b)
        return m.Reshape([.. m.Shape[..^2], m.Size(-2) * m.Size(-1)]);
    }

    /// <summary>B (out, r) from logits (…, out/b, r, h): (out/b, r, b) → (out/b, b, r) → (out, r).</summary>
    public static Tensor ComposeB(Tensor logitsB, Tensor bank, int topK)
    {
        var m = Mix(logitsB, bank, topK).Transpose(-2, -1);      // (…, out/b, b, r)
        return m.Reshape([.. m.Shape[..^3], m.Size(-3) * m.Size(-2), m.Size(-1)]);
    }

    public (Tensor A, Tensor B) Factors() => (ComposeA(LogitsA, Bank, TopK), ComposeB(LogitsB, Bank, TopK));

    private (Tensor A, Tensor B) CurrentFactors() =>
        Step is { } s ? (s.A.Select(0, s.IndexA), s.B.Select(0, s.IndexB)) : Factors();

    /// <summary>Without dropout, base and adapter are one node over the step's composed factors: LoRA's fused linear
    /// when the math is in x's dtype (mixed, or factors in x's dtype), its exact fp32 node over a bf16 base on CUDA;
    /// otherwise null (the base product, then <see cref="Forward"/>).</summary>
    public Tensor? ForwardWhole(Tensor x)
    {
        if (Merged || (Dropout > 0 && Training) || x.DType != Base.Weight.DType) return null;
        var dtype = Bank.DType;   // the composed factors' dtype
        var exact = !Mixed && AdapterOps.LoraLinearExactApplies(x, dtype);
        if (!(Mixed || dtype == x.DType || exact)) return null;
        var (a, b) = CurrentFactors();
        return exact ? AdapterOps.LoraLinearExact(x, Base.Weight, Base.Bias, a, b, 1.0)
                     : AdapterOps.LoraLinear(x, Base.Weight, Base.Bias, a, b, 1.0);
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        var (a, b) = CurrentFactors();
        if (Mixed && x.DType != a.DType)
        {
            // The factors are composed in fp32 (once per step); only their use is in x's dtype.
            var hm = Dropout > 0 ? F.Dropout(x, Dropout, Training, DropoutSeed) : x;
            return baseOutput + AdapterInput.LowRank(hm, a, b);
        }
        var h = AdapterInput.As(x, ScalarType.Float32);   // one cast per input shared by several modules
        if (Dropout > 0) h = F.Dropout(h, Dropout, Training, DropoutSeed);
        return AdapterInput.AddInto(baseOutput, F.Linear(F.Linear(h, a), b));
    }

    public Tensor DeltaWeight()
    {
        using var scope = DisposeScope.Begin();
        var (a, b) = Factors();
        return b.MatMul(a).MoveToOuterScope();
    }

    public void Dispose()
    {
        LogitsA.Dispose();
        LogitsB.Dispose();
    }
}

/// <summary>
/// VB-LoRA (PEFT VBLORA). The method owns the bank <c>base_model.vblora_vector_bank</c> (h, b), shared by every layer.
/// Compose once per step: <see cref="BeginStep"/> builds every module's A and B from logits and bank with the autograd
/// graph (one batched composition per distinct logits shape), hands the layers detached leaf copies so the micro-batches
/// accumulate their gradients there, and <see cref="EndBackward"/> runs one backward from the composed factors with those
/// gradients into logits and bank. Mathematically the same gradients as composing in every micro-batch's forward
/// (Σ_mb Jᵀg_mb = Jᵀ Σ_mb g_mb), with one composition and one backward through it per step instead of one per micro-batch.
/// </summary>
public sealed class VbLoraAdapter(VbLoraMethod spec) : AdapterMethodBase(spec)
{
    public const string BankName = "base_model.vblora_vector_bank";
    public const double InitVectorBankBound = 0.02;
    public const double InitLogitsStd = 0.1;

    private Tensor? _bank;
    private readonly List<StepGroup> _step = [];

    public VbLoraMethod VbLora { get; } = spec;
    public Tensor Bank => _bank ?? throw new InvalidOperationException("not attached");

    /// <summary>Modules whose logits have one shape, composed together: the graph-connected factors and their leaves.</summary>
    private sealed record StepGroup(Tensor Composed, Tensor Leaf);

    protected override IReadOnlyList<(string Name, Tensor Tensor)> CreateMethodTensors(Llama model, Generator gen)
    {
        using var bank = Tensor.Empty([VbLora.NumVectors, VbLora.VectorLength]).Uniform_(-InitVectorBankBound, InitVectorBankBound, gen);
        _bank = LoraLayer.Owned(bank.To(model.Device, ScalarType.Float32).Clone());
        return [(BankName, _bank)];
    }

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new VbLoraLayer(linear, Bank, VbLora.R, VbLora.TopK, VbLora.Dropout, InitLogitsStd, gen);

    private IEnumerable<VbLoraLayer> VbLayers => Layers.Values.Cast<VbLoraLayer>();

    /// <summary>Two AdamW groups: logits (PEFT's advice: ≈ 1e-2) and the bank (≈ 1e-3); the job's schedule scales both.</summary>
    public override IReadOnlyList<ParamGroup> ParamGroups(Hyperparameters hyper) =>
    [
        new ParamGroup("vblora_logits", VbLayers.SelectMany(l => new[] { l.LogitsA, l.LogitsB }).ToList(), VbLora.LogitsLearningRate, hyper.WeightDecay),
        new ParamGroup("vblora_vector_bank", [Bank], VbLora.VectorBankLearningRate, hyper.WeightDecay),
    ];

    public override void BeginStep(long step)
    {
        ClearStep();
        if (Merged) return;
        var layers = VbLayers.ToList();
        var a = ComposeGroups(layers, l => l.LogitsA, VbLoraLayer.ComposeA);
        var b = ComposeGroups(layers, l => l.LogitsB, VbLoraLayer.ComposeB);
        foreach (var l in layers) l.Step = (a[l].Leaf, a[l].Index, b[l].Leaf, b[l].Index);
    }

    /// <summary>Composes the factors of all modules whose logits have one shape as one stack (a handful of kernels per
    /// shape instead of per module) and returns, per layer, the stack's leaf copy and the layer's index in it.</summary>
    private Dictionary<VbLoraLayer, (Tensor Leaf, int Index)> ComposeGroups(List<VbLoraLayer> layers, Func<VbLoraLayer, Tensor> logits,
                                                                           Func<Tensor, Tensor, int, Tensor> compose)
    {
        var bound = new Dictionary<VbLoraLayer, (Tensor, int)>();
        foreach (var group in layers.GroupBy(l => string.Join(",", logits(l).Shape)))
        {
            var members = group.ToList();
            Tensor composed, leaf;
            using (DisposeScope.Begin())
            {
                composed = DisposeScope.Keep(compose(Tensor.Stack(members.Select(logits).ToList()), Bank, VbLora.TopK));
                using (Torch.Torch.NoGrad()) leaf = DisposeScope.Keep(composed.Detach().RequiresGrad_());
            }
            _step.Add(new StepGroup(composed, leaf));
            for (var i = 0; i < members.Count; i++) bound[members[i]] = (leaf, i);
        }
        return bound;
    }

    public override void EndBackward()
    {
        if (_step.Count == 0) return;
        try
        {
            using var scope = DisposeScope.Begin();
            var grads = _step.Select(g => g.Leaf.Grad).ToList();
            Tensor.Backward(_step.Select(g => g.Composed).ToList(), grads);
        }
        finally { ClearStep(); }
    }

    private void ClearStep()
    {
        foreach (var l in VbLayers) l.Step = null;
        foreach (var g in _step)
        {
            g.Composed.Dispose();
            g.Leaf.Dispose();
        }
        _step.Clear();
    }

    protected override void DisposeState() => ClearStep();

    protected override JsonObject AdapterConfig(string baseModelName)
    {
        var c = AdapterFiles.CommonConfig("VBLORA", baseModelName, TargetModules);
        c["r"] = VbLora.R;
        c["num_vectors"] = VbLora.NumVectors;
        c["vector_length"] = VbLora.VectorLength;
        c["topk"] = VbLora.TopK;
        c["save_only_topk_weights"] = VbLora.SaveOnlyTopkWeights;
        c["vblora_dropout"] = VbLora.Dropout;
        c["fan_in_fan_out"] = false;
        c["init_vector_bank_bound"] = InitVectorBankBound;
        c["init_logits_std"] = InitLogitsStd;
        c["exclude_modules"] = null;
        return c;
    }

    /// <summary>PEFT's index dtype for the top-k form: the narrowest that holds numVectors − 1.</summary>
    public static ScalarType IndexDType(int numVectors) =>
        numVectors < 1 << 8 ? ScalarType.UInt8 : numVectors < 1 << 15 ? ScalarType.Int16 : ScalarType.Int32;

    /// <summary>The logits and the bank, or (save_only_topk_weights) per logits tensor PEFT's
    /// <c>…_topk_indices</c> and the first k−1 softmax weights <c>…_topk_weights</c>, plus the bank.</summary>
    protected override IReadOnlyDictionary<string, Tensor> NativeTensors()
    {
        if (!VbLora.SaveOnlyTopkWeights) return base.NativeTensors();
        var d = new Dictionary<string, Tensor> { [BankName] = Bank };
        foreach (var (name, t) in TrainableTensors.Where(t => t.Name != BankName))
        {
            var (values, indices) = t.TopK(VbLora.TopK, -1);
            d[$"{name}_topk_indices"] = indices.To(IndexDType(VbLora.NumVectors)).Contiguous();
            d[$"{name}_topk_weights"] = values.Softmax(-1).Narrow(-1, 0, VbLora.TopK - 1).Contiguous();
        }
        return d;
    }

    /// <summary>Reads either form. The top-k form becomes logits as PEFT rebuilds them: log of the k weights (the last
    /// one is 1 − Σ of the stored ones) at their indices, −∞ elsewhere, so the same k vectors mix with the same weights.</summary>
    protected override void LoadNative(IReadOnlyDictionary<string, Tensor> tensors)
    {
        if (!tensors.Keys.Any(k => k.EndsWith("_topk_indices", StringComparison.Ordinal)))
        {
            LoadTrainable(tensors);
            return;
        }
        using var scope = DisposeScope.Begin();
        var full = new Dictionary<string, Tensor>();
        if (tensors.TryGetValue(BankName, out var bank)) full[BankName] = bank;
        foreach (var (name, t) in TrainableTensors.Where(t => t.Name != BankName))
        {
            if (!tensors.TryGetValue($"{name}_topk_indices", out var idx) || !tensors.TryGetValue($"{name}_topk_weights", out var w))
                throw new InvalidDataException($"adapter tensors missing: {name}_topk_indices / {name}_topk_weights");
            full[name] = LogitsFromTopK(idx, w, t.Shape);
        }
        LoadTrainable(full);
    }

    private Tensor LogitsFromTopK(Tensor indices, Tensor weights, long[] shape)
    {
        var k = VbLora.TopK;
        var h = shape[^1];
        var rows = shape[..^1].Aggregate(1L, (a, b) => a * b);
        long[] expectedIdx = [.. shape[..^1], k], expectedW = [.. shape[..^1], k - 1];
        if (!indices.Shape.SequenceEqual(expectedIdx) || !weights.Shape.SequenceEqual(expectedW))
            throw new InvalidDataException($"top-k tensors have shapes ({string.Join(", ", indices.Shape)}) and " +
                $"({string.Join(", ", weights.Shape)}), expected ({string.Join(", ", expectedIdx)}) and ({string.Join(", ", expectedW)})");
        var idx = indices.To(Device.Cpu, ScalarType.Int64).ToArray<long>();
        var wt = weights.To(Device.Cpu, ScalarType.Float32).ToArray<float>();
        var logits = new float[rows * h];
        Array.Fill(logits, float.NegativeInfinity);
        for (long row = 0; row < rows; row++)
        {
            var rest = 1.0f;
            for (var j = 0; j < k; j++)
            {
                float weight;
                if (j < k - 1) { weight = wt[row * (k - 1) + j]; rest -= weight; }
                else weight = Math.Max(rest, 0f);      // rounding can leave −1e-8: a zero weight, not a NaN
                var i = idx[row * k + j];
                if (i < 0 || i >= h) throw new InvalidDataException($"top-k index {i} is outside the bank (0..{h - 1})");
                logits[row * h + i] = MathF.Log(weight);
            }
        }
        return Tensor.From(logits, shape);
    }

    /// <summary>The exact plain-LoRA form in <c>lora/</c>: the composed A (r, in) and B (out, r), alpha = r (s = 1).</summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.Torch.NoGrad();
        var modules = new List<LoraExport.Module>();
        foreach (var (path, layer) in Layers)
        {
            var (a, b) = ((VbLoraLayer)layer).Factors();
            modules.Add(new LoraExport.Module(path, a, b));
        }
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info);
        ExportInfo = info;
        return files;
    }
}
