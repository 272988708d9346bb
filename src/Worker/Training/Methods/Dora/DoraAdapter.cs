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
/// The per-step cost over LoRA is materialising W + s·B·A (out × in, fp32) for the norm, as PEFT does.
/// </summary>
public sealed class DoraLayer : IAdapterLayer
{
    public Linear Base { get; }
    public Tensor A { get; }
    public Tensor B { get; }
    /// <summary>m (out): ‖W + s·B·A‖ per output row at init (= ‖W‖, B being 0).</summary>
    public Tensor Magnitude { get; }
    public double Scaling { get; }
    public double Dropout { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors =>
        [("lora_A.weight", A), ("lora_B.weight", B), ("lora_magnitude_vector", Magnitude)];

    // ‖W + s·B·A‖ of the unmerged W, taken by the merge: a merged W no longer gives it (PEFT caches it too).
    private Tensor? _mergeNorm;

    public DoraLayer(Linear linear, int r, double scaling, double dropout, Generator gen, string init)
    {
        (Base, Scaling, Dropout) = (linear, scaling, dropout);
        var (a, b) = LoraLayer.RandomFactors(linear, r, init, gen);
        (A, B) = (LoraLayer.Owned(a), LoraLayer.Owned(b));
        using (Torch.Torch.NoGrad()) Magnitude = LoraLayer.Owned(DisposeScope.Keep(WeightNorm()));
    }

    /// <summary>‖W + s·B·A‖ per output row, fp32, without gradient. The same expression at init and in the forward, so
    /// f = m / norm is exactly 1 while B = 0. Its (out × in) temporaries are freed at once, not at the end of the step's
    /// scope: held for every layer until the backward they would add up to a full fp32 copy of the adapted weights.</summary>
    private Tensor WeightNorm()
    {
        using var noGrad = Torch.Torch.NoGrad();
        using var scope = DisposeScope.Begin();
        return (Base.Weight.To(ScalarType.Float32) + B.MatMul(A) * Scaling).Norm(2, [1]).MoveToOuterScope();
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        var h = x.DType == ScalarType.Float32 ? x : x.To(ScalarType.Float32);
        Tensor wx;
        if (Dropout > 0 && Training)
        {
            h = F.Dropout(h, Dropout, true);
            wx = F.Linear(h, Base.Weight.To(ScalarType.Float32));
        }
        else
        {
            wx = Base.Bias is null ? baseOutput : baseOutput - Base.Bias;
            if (wx.DType != ScalarType.Float32) wx = wx.To(ScalarType.Float32);
        }
        var f = Magnitude / WeightNorm();
        var y = baseOutput + (f - 1) * wx + f * (F.Linear(F.Linear(h, A), B) * Scaling);
        return y.DType == baseOutput.DType ? y : y.To(baseOutput.DType);
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
