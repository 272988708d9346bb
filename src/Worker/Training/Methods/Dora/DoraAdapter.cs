using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.Dora;

/// <summary>
/// DoRA as PEFT's DoraLinearLayer computes it: with f = m / ‖W + s·B·A‖_row (the norm detached from the graph, the
/// paper's section 4.3), y = base + (f − 1)·(x Wᵀ) + f·s·(x Aᵀ) Bᵀ, i.e. W' = f·(W + s·B·A). Without dropout the x Wᵀ
/// term is the base output minus its bias (no second matmul); with dropout both terms see the dropped x, as in PEFT.
/// <para>
/// The per-step cost over LoRA is the row norm, taken from the factored form instead of materialising W + s·B·A:
/// ‖W_i + s·(BA)_i‖² = ‖W_i‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k B_ik (B·(A Aᵀ))_ik. ‖W_i‖² is constant while W is frozen
/// (cached; recomputed after a merge or unmerge wrote W). FLOPs and memory per module and step (W out × in, rank r):
/// the materialised form (PEFT's) costs 2·out·in·r FLOPs for B·A plus four fp32 (out × in) temporaries (W cast to
/// fp32, B·A, its scaling, the sum) written and read again: for Llama-3.2-1B's 7 linears × 16 layers (0.97 G weights)
/// ~3.9 G fp32 elements, ~16 GB of writes per forward, a module's all live at once. The factored
/// form costs the same 2·out·in·r FLOPs (W·Aᵀ) but reads W once in its own dtype (~2 GB for the 1B model in bf16) and
/// otherwise touches only (out, r), (r, r) and (out,) tensors: no (out × in) temporary. At r = 32 both are bound by
/// memory traffic, not FLOPs, so the traffic is what is saved.
/// W Aᵀ runs in W's dtype (bf16 on the GPU, accumulated in fp32 by the GEMM, output rounded to bf16); the dominant
/// ‖W‖² term is exact fp32, so the norm's relative error vs PEFT's fp32 form is ~2e-5 while ‖s·B·A‖ is a tenth of ‖W‖
/// and ~1e-4 when they are comparable (measured in the tests): far below the bf16 rounding (4e-3) of the base output
/// that f multiplies. An fp32 W (the CPU) computes W·Aᵀ in fp32: the two forms then agree to fp32 rounding (test: < 1e-5).
/// </para>
/// </summary>
public sealed class DoraLayer : IAdapterLayer, IWholeLinearAdapter
{
    public Linear Base { get; }
    public Tensor A { get; }
    public Tensor B { get; }
    /// <summary>m (out): ‖W + s·B·A‖ per output row at init (= ‖W‖, B being 0).</summary>
    public Tensor Magnitude { get; }
    public double Scaling { get; }
    public double Dropout { get; }

    /// <summary>Set by the merge and unmerge right after they wrote W: the cached ‖W‖² no longer holds.</summary>
    public bool Merged
    {
        get => _merged;
        set
        {
            _merged = value;
            _baseSquaredNorm?.Dispose();
            _baseSquaredNorm = null;
        }
    }

    public bool Training { get; set; } = true;
    public long DropoutSeed { get; set; }
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors =>
        [("lora_A.weight", A), ("lora_B.weight", B), ("lora_magnitude_vector", Magnitude)];

    private bool _merged;
    // ‖W + s·B·A‖ of the unmerged W, taken by the merge: a merged W no longer gives it (PEFT caches it too).
    private Tensor? _mergeNorm;
    // ‖W_i‖² (out, fp32) of the current W; null until first use and after W was written.
    private Tensor? _baseSquaredNorm;

    public DoraLayer(Linear linear, int r, double scaling, double dropout, Generator gen, string init)
    {
        (Base, Scaling, Dropout) = (linear, scaling, dropout);
        var (a, b) = LoraLayer.RandomFactors(linear, r, init, gen);
        (A, B) = (LoraLayer.Owned(a), LoraLayer.Owned(b));
        using (Torch.Torch.NoGrad()) Magnitude = LoraLayer.Owned(DisposeScope.Keep(WeightNorm()));
    }

    /// <summary>‖W_i‖² per output row in fp32. A bf16 W is cast to fp32 once here (one module's (out × in) copy, freed at
    /// once); an fp32 W is not copied. Norm then square rather than square then sum: no second (out × in) temporary.</summary>
    private Tensor BaseSquaredNorm()
    {
        if (_baseSquaredNorm is not null) return _baseSquaredNorm;
        using var noGrad = Torch.Torch.NoGrad();
        using var scope = DisposeScope.Begin();
        _baseSquaredNorm = DisposeScope.Keep(Base.Weight.To(ScalarType.Float32).Norm(2, [1]).Square());
        return _baseSquaredNorm;
    }

    /// <summary>‖W + s·B·A‖ per output row, fp32, without gradient, from the factored form (class summary). The same
    /// function at init and in the forward, so f = m / norm is exactly 1 while B = 0 (both extra terms are then 0).
    /// The squared norm is clamped at 0 before the root: rounding can make a near-zero row slightly negative.</summary>
    public Tensor WeightNorm()
    {
        using var noGrad = Torch.Torch.NoGrad();
        using var scope = DisposeScope.Begin();
        var w = Base.Weight;
        var a = A.DType == ScalarType.Float32 ? A : A.To(ScalarType.Float32);
        var b = B.DType == ScalarType.Float32 ? B : B.To(ScalarType.Float32);
        var wAt = w.MatMul((a.DType == w.DType ? a : a.To(w.DType)).T());          // (out, r), in W's dtype
        if (wAt.DType != ScalarType.Float32) wAt = wAt.To(ScalarType.Float32);
        var bAAt = b.MatMul(a.MatMul(a.T()));                                       // (out, r)
        var cross = (b * (wAt * (2 * Scaling) + bAAt * (Scaling * Scaling))).Sum([1]);
        return (BaseSquaredNorm() + cross).Clamp(0, null).Sqrt().MoveToOuterScope();
    }

    /// <summary>Without dropout W' x = f·(x Wᵀ + s·(x Aᵀ) Bᵀ). adapterDtype mixed: the whole module is LoRA's fused linear
    /// node in x's dtype times f (cast to it; m's gradient comes back in fp32 through the cast), plus the bias. fp32
    /// adapters over a bf16 base on CUDA: DoRA's exact node (<see cref="AdapterOps.DoraLinearExact"/>), fp32 adapter
    /// math without fp32 activations. Otherwise null: the base product, then <see cref="Forward"/> (PEFT's formula, in
    /// fp32).</summary>
    public Tensor? ForwardWhole(Tensor x)
    {
        if (Merged || (Dropout > 0 && Training) || x.DType != Base.Weight.DType || x.DType == A.DType) return null;
        if (!Mixed)
            return AdapterOps.LoraLinearExactApplies(x, A.DType)
                ? AdapterOps.DoraLinearExact(x, Base.Weight, Base.Bias, A, B, Magnitude / WeightNorm(), Scaling)
                : null;
        var y = AdapterOps.LoraLinear(x, Base.Weight, null, A, B, Scaling) * (Magnitude / WeightNorm()).To(x.DType);
        return Base.Bias is null ? y : y + Base.Bias;
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        var h = AdapterInput.As(x, ScalarType.Float32);
        var f = Magnitude / WeightNorm();
        if (Dropout > 0 && Training)
        {
            // PEFT's formula: base + (f − 1)·(h Wᵀ) + f·s·(h Aᵀ) Bᵀ with h the dropped input. h Wᵀ in W's dtype, as the base
            // output is: an fp32 cast of W here would be an (out × in) copy per forward, kept until the backward.
            h = F.Dropout(h, Dropout, true, DropoutSeed);
            var w = Base.Weight;
            var wx = w.DType == ScalarType.Float32 ? F.Linear(h, w) : F.Linear(h.To(w.DType), w).To(ScalarType.Float32);
            var y = baseOutput + (f - 1) * wx + f * (F.Linear(F.Linear(h, A), B) * Scaling);
            return y.DType == baseOutput.DType ? y : y.To(baseOutput.DType);
        }
        // Without dropout baseOutput = x Wᵀ + b, and the same formula is f·(x Wᵀ + s·(x Aᵀ) Bᵀ) + b: in fp32, the sum
        // made in place in the fresh fp32 copy of x Wᵀ, then one scale, instead of five (tokens × out) fp32 passes
        // (equal up to fp32 rounding).
        var wx32 = Base.Bias is null ? baseOutput : baseOutput - Base.Bias;
        var fresh = !ReferenceEquals(wx32, baseOutput) || wx32.DType != ScalarType.Float32;
        if (wx32.DType != ScalarType.Float32) wx32 = wx32.To(ScalarType.Float32);
        var lowRank = AdapterInput.ScaledLowRank(h, A, B, Scaling);
        var yf = (fresh ? wx32.Add_(lowRank) : wx32 + lowRank) * f;
        if (Base.Bias is not null) yf = yf + Base.Bias;   // before the one rounding to the base's dtype
        return yf.DType == baseOutput.DType ? yf : yf.To(baseOutput.DType);
    }

    /// <summary>ΔW = f·(W + s·B·A) − W (fp32). Merged, W holds W' = f·(W₀ + s·B·A), so W₀ = W'/f − s·B·A with the f of
    /// the merge, and ΔW = W' − W₀: what unmerge subtracts.</summary>
    public Tensor DeltaWeight()
    {
        using var noGrad = Torch.Torch.NoGrad();
        var w = Base.Weight.To(ScalarType.Float32);
        var lora = B.MatMul(A) * Scaling;
        if (!Merged)
        {
            var v = w + lora;
            var norm = v.Norm(2, [1]);
            _mergeNorm?.Dispose();
            _mergeNorm = DisposeScope.Keep(norm.Clone());
            return (Magnitude / norm).Unsqueeze(1) * v - w;
        }
        if (_mergeNorm is null) throw new InvalidOperationException("DoRA layer is marked merged but was never merged");
        var f = (Magnitude / _mergeNorm).Unsqueeze(1);
        return w - (w / f - lora);
    }

    public void Dispose()
    {
        A.Dispose();
        B.Dispose();
        Magnitude.Dispose();
        _mergeNorm?.Dispose();
        _baseSquaredNorm?.Dispose();
    }
}

public sealed class DoraAdapter(DoraMethod spec) : AdapterMethodBase(spec)
{
    public DoraMethod Dora { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new DoraLayer(linear, Dora.R, Dora.Scaling, Dora.Dropout, gen, Dora.Init);

    public override IReadOnlyList<ParamGroup> ParamGroups(Hyperparameters hyper) =>
        LoraPlus.Groups(TrainableTensors, hyper, Dora.LoraPlusRatio);

    /// <summary>PEFT's LORA config with use_dora; the magnitude is stored as <c>…lora_magnitude_vector</c>.</summary>
    protected override JsonObject AdapterConfig(string baseModelName) =>
        LoraAdapter.LoraConfig(baseModelName, TargetModules, Dora.R, Dora.Alpha, Dora.Dropout, Dora.Rslora,
            LoraAdapter.InitLoraWeights(Dora.Init), useDora: true);

    /// <summary>
    /// <c>lora/</c>: DoRA's ΔW = (f − 1)·W + f·s·B·A is in general of full rank (the first term rescales W's rows), so
    /// the plain-LoRA form is its best rank-r approximation (truncated SVD), with the relative error per module in
    /// metadata.json. It is exact where r ≥ min(out, in).
    /// </summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        var modules = new List<LoraExport.Module>();
        foreach (var (path, layer) in Layers)
        {
            using var perModule = DisposeScope.Begin();    // one module's ΔW (out × in) at a time
            var m = LoraExport.FromDelta(path, layer.DeltaWeight(), Dora.R);
            modules.Add(m with { A = m.A.MoveToOuterScope(), B = m.B.MoveToOuterScope() });
        }
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info,
            $"DoRA: rank-{Dora.R} truncated SVD of each module's delta weight");
        ExportInfo = info;
        return files;
    }
}
