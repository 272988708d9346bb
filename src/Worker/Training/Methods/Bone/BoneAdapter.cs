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
/// </summary>
public sealed class BoneLayer : IAdapterLayer
{
    public Linear Base { get; }
    public int R { get; }
    public Tensor D { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [("miss_block", D)];

    public BoneLayer(Linear linear, int r)
    {
        (Base, R) = (linear, r);
        D = LoraLayer.Owned(Tensor.Zeros([r, linear.OutFeatures], ScalarType.Float32, linear.Weight.Device));
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        var h = x.DType == ScalarType.Float32 ? x : x.To(ScalarType.Float32);
        var inFeatures = h.Size(-1);
        var pad = (R - inFeatures % R) % R;
        if (pad > 0) h = h.Pad([0, pad]);
        long[] chunked = [.. h.Shape[..^1], (inFeatures + pad) / R, R];
        var y = baseOutput + h.Reshape(chunked).Sum([-2]).MatMul(D);
        return y.DType == baseOutput.DType ? y : y.To(baseOutput.DType);
    }

    /// <summary>ΔW (out, in) with ΔW[o, i] = D[i mod r, o].</summary>
    public Tensor DeltaWeight()
    {
        var inFeatures = Base.InFeatures;
        return D.T().Repeat(1, (inFeatures + R - 1) / R).Narrow(1, 0, inFeatures).Contiguous();
    }

    /// <summary>The exact LoRA form's A (r, in): A[i mod r, i] = 1.</summary>
    public static Tensor LoraA(int r, long inFeatures)
    {
        var a = new float[r * inFeatures];
        for (long i = 0; i < inFeatures; i++) a[(i % r) * inFeatures + i] = 1f;
        return Tensor.From(a, r, inFeatures);
    }

    public void Dispose() => D.Dispose();
}

public sealed class BoneAdapter(BoneMethod spec) : AdapterMethodBase(spec)
{
    public BoneMethod Bone { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) => new BoneLayer(linear, Bone.R);

    protected override JsonObject AdapterConfig(string baseModelName)
    {
        var c = AdapterFiles.CommonConfig("MISS", baseModelName, TargetModules);
        c["r"] = Bone.R;
        c["init_weights"] = true;
        c["mini_r"] = 1;
        c["miss_dropout"] = 0.0;
        return c;
    }

    /// <summary>The exact plain-LoRA form in <c>lora/</c>: A[i mod r, i] = 1, B = Dᵀ (ΔW = B·A, s = 1).</summary>
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
            modules.Add(new LoraExport.Module(path, a, bone.D.Detach().T()));
        }
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info);
        ExportInfo = info;
        return files;
    }
}
