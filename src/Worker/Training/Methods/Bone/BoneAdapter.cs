using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.Bone;

/// <summary>
/// Bone (PEFT MiSS, default mode): one block D (r, out), zero-init, shared by the input's r-sized chunks:
/// Δy = (Σ_k x[.., k·r:(k+1)·r]) D, i.e. ΔW[o, i] = D[i mod r, o]. The forward never builds ΔW (out × in): it sums the
/// chunks of x (zero-padded to a multiple of r) and multiplies by D, so its cost is one (…, r)·(r, out) matmul.
/// Mini mode (PEFT <c>init_weights="mini"</c>): D (r, miniR) stands for D.repeat(1, out/miniR); the forward multiplies
/// by the small D and tiles the (…, miniR) result along the output, so ΔW[o, i] = D[i mod r, o mod miniR].
/// </summary>
public sealed class BoneLayer : IAdapterLayer, IWholeLinearAdapter
{
    public Linear Base { get; }
    public int R { get; }
    public Tensor D { get; }
    /// <summary>Mini mode: D's width (it is tiled out/MiniR times); null in default mode.</summary>
    public int? MiniR { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [("miss_block", D)];

    public BoneLayer(Linear linear, int r, int? miniR = null)
    {
        (Base, R, MiniR) = (linear, r, miniR);
        if (miniR is { } m && linear.OutFeatures % m != 0)
            throw new ArgumentException($"miniR={m} does not divide the output size of a ({linear.OutFeatures}, {linear.InFeatures}) module");
        D = LoraLayer.Owned(Tensor.Zeros([r, miniR ?? linear.OutFeatures], ScalarType.Float32, linear.Weight.Device));
    }

    /// <summary>The (r, out) block that D stands for: D itself, or in mini mode D tiled along the output.</summary>
    public Tensor FullBlock() => MiniR is { } m ? D.Repeat(1, Base.OutFeatures / m) : D;

    // The (r, in) one-hot chunk-sum matrix in the compute dtype, made on first use: Σ_k x[.., k·r:(k+1)·r] = x Sᵀ.
    private Tensor? _chunkSum;

    /// <summary>
    /// Default mode whenever the math runs in x's dtype on a GPU (mixed, bf16 adapters, an fp32 base), and mixed on any
    /// device: Bone is LoRA with the
    /// fixed A = S (the chunk sum, S[k, i] = 1 for i mod r = k) and B = Dᵀ, so the module is LoRA's fused linear node:
    /// the (…, out) product adds into the base GEMM and x's gradient gets the adapter's share inside a GEMM, where
    /// the composed form writes a (…, out) delta, adds it, and broadcasts the (…, r) gradient back over x's chunks.
    /// S gets no gradient. Mini mode (D tiled along the output), and fp32 math on a bf16 base, take <see cref="Forward"/>.
    /// </summary>
    public Tensor? ForwardWhole(Tensor x)
    {
        // On the CPU the composed form stays: there FLOPs, not memory passes, are the cost, and the chunk sum as a
        // GEMM does r times the additions of the sum (the CPU benchmark measured Bone 12 % slower through the node).
        if (Merged || MiniR is not null || x.DType != Base.Weight.DType) return null;
        // fp32 adapter math over a bf16 base on CUDA: LoRA's exact node (three-term splits; the one-hot A is one term).
        var exact = !Mixed && AdapterOps.LoraLinearExactApplies(x, D.DType);
        var fused = exact || (Mixed && x.DType != D.DType) || (D.DType == x.DType && x.Device.Kind == DeviceKind.Cuda);
        if (!fused) return null;
        var chunkDType = exact ? ScalarType.Float32 : x.DType;
        if (_chunkSum is null || _chunkSum.DType != chunkDType)
        {
            _chunkSum?.Dispose();
            using var scope = DisposeScope.Begin();
            _chunkSum = DisposeScope.Keep(LoraA(R, Base.InFeatures).To(x.Device, chunkDType));
        }
        return exact ? AdapterOps.LoraLinearExact(x, Base.Weight, Base.Bias, _chunkSum, D.T(), 1.0, aExactInBf16: true)
                     : AdapterOps.LoraLinear(x, Base.Weight, Base.Bias, _chunkSum, D.T(), 1.0);
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        // The chunk sum reads x in its own dtype and accumulates in D's (fp32 masters, or bf16 with adapterDtype bf16):
        // no (…, in) copy of x in fp32 per module, only the (…, r) sum.
        var h = x;
        var inFeatures = h.Size(-1);
        var pad = (R - inFeatures % R) % R;
        if (pad > 0) h = h.Pad([0, pad]);
        long[] chunked = [.. h.Shape[..^1], (inFeatures + pad) / R, R];
        var sum = h.Reshape(chunked).Sum([-2], false, D.DType);
        // mixed: the (…, r) sum is accumulated in fp32 as above, then the product and the (…, out) result are in x's
        // dtype (D cast for it), so no fp32 (tokens × out) tensor is made.
        var delta = Mixed && x.DType != D.DType ? sum.To(x.DType).MatMul(D.To(x.DType)) : sum.MatMul(D);
        if (MiniR is { } m)
        {
            var tiles = Enumerable.Repeat(1L, delta.Dim).ToArray();
            tiles[^1] = Base.OutFeatures / m;
            delta = delta.Repeat(tiles);
        }
        return AdapterInput.AddInto(baseOutput, delta);
    }

    /// <summary>ΔW (out, in) with ΔW[o, i] = D[i mod r, o] (mini: D[i mod r, o mod miniR]).</summary>
    public Tensor DeltaWeight()
    {
        var inFeatures = Base.InFeatures;
        return FullBlock().T().Repeat(1, (inFeatures + R - 1) / R).Narrow(1, 0, inFeatures).Contiguous();
    }

    /// <summary>The exact LoRA form's A (r, in): A[i mod r, i] = 1.</summary>
    public static Tensor LoraA(int r, long inFeatures)
    {
        var a = new float[r * inFeatures];
        for (long i = 0; i < inFeatures; i++) a[(i % r) * inFeatures + i] = 1f;
        return Tensor.From(a, r, inFeatures);
    }

    public void Dispose()
    {
        D.Dispose();
        _chunkSum?.Dispose();
    }
}

public sealed class BoneAdapter(BoneMethod spec) : AdapterMethodBase(spec)
{
    public BoneMethod Bone { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new BoneLayer(linear, Bone.R, Bone.Mini ? Bone.MiniR : null);

    protected override JsonObject AdapterConfig(string baseModelName)
    {
        var c = AdapterFiles.CommonConfig("MISS", baseModelName, TargetModules);
        c["r"] = Bone.R;
        c["init_weights"] = Bone.Mini ? JsonValue.Create("mini") : JsonValue.Create(true);
        c["mini_r"] = Bone.Mini ? Bone.MiniR : 1;
        c["miss_dropout"] = 0.0;
        return c;
    }

    /// <summary>The exact plain-LoRA form in <c>lora/</c>: A[i mod r, i] = 1, B = Dᵀ (mini: the tiled D), ΔW = B·A, s = 1.</summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        var aByIn = new Dictionary<long, Tensor>();
        var modules = new List<LoraExport.Module>();
        foreach (var (path, layer) in Layers)
        {
            var bone = (BoneLayer)layer;
            var inFeatures = bone.Base.InFeatures;
            if (!aByIn.TryGetValue(inFeatures, out var a)) aByIn[inFeatures] = a = BoneLayer.LoraA(Bone.R, inFeatures);
            modules.Add(new LoraExport.Module(path, a, bone.FullBlock().Detach().T()));
        }
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info);
        ExportInfo = info;
        return files;
    }
}
