using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.SBoRA;

/// <summary>
/// SBoRA on one linear. FA: r distinct input indices idx, trainable B (out, r), Δy = s·dropout(x[.., idx])Bᵀ, so only
/// W[:, idx] changes. FB: r distinct output indices, trainable A (r, in), Δy[.., idx] += s·dropout(x)Aᵀ, so only W[idx, :]
/// changes. The frozen one-hot factor is never built: FA selects r input features, FB adds into r outputs. idx is
/// drawn from the job's seed (sorted ascending) and saved with the adapter as <c>sbora_idx</c> (int64).
/// </summary>
public sealed class SboraLayer : IAdapterLayer
{
    public Linear Base { get; }
    public bool Fa { get; }
    public double Scaling { get; }
    public double Dropout { get; }
    /// <summary>FA: B (out, r); FB: A (r, in). Zero at start.</summary>
    public Tensor Factor { get; }
    /// <summary>The r indices: input features for FA, output features for FB.</summary>
    public Tensor Index { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public long DropoutSeed { get; set; }
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [(Fa ? "sbora_B.weight" : "sbora_A.weight", Factor)];
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Frozen => [("sbora_idx", Index)];

    /// <summary>How many features the indices choose from: in for FA, out for FB.</summary>
    public long Extent => Fa ? Base.InFeatures : Base.OutFeatures;

    public SboraLayer(Linear linear, bool fa, int r, double scaling, double dropout, Generator gen)
    {
        (Base, Fa, Scaling, Dropout) = (linear, fa, scaling, dropout);
        var device = linear.Weight.Device;
        if (r > Extent) throw new ArgumentException($"sbora: r={r} exceeds the {(fa ? "input" : "output")} size of a ({linear.OutFeatures}, {linear.InFeatures}) module");
        long[] idx;
        using (var perm = Tensor.RandPerm(Extent, gen)) idx = perm.ToArray<long>()[..r];
        Array.Sort(idx);
        using (var cpu = Tensor.From(idx)) Index = Keep(cpu.To(device));
        Factor = LoraLayer.Owned(Tensor.Zeros(fa ? [linear.OutFeatures, r] : [r, linear.InFeatures], ScalarType.Float32, device));
    }

    private static Tensor Keep(Tensor t)
    {
        DisposeScope.Keep(t);
        return t;
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        if (Mixed && x.DType != Factor.DType && baseOutput.DType == x.DType)
        {
            // In x's dtype with the fp32 factor cast for the product; the same selection and scatter as below.
            var f = Factor.To(x.DType);
            if (Fa)
            {
                var hm = x.IndexSelect(x.Dim - 1, Index);
                if (Dropout > 0) hm = F.Dropout(hm, Dropout, Training, DropoutSeed);
                return baseOutput.Add(F.Linear(hm, f), Scaling);
            }
            var xm = Dropout > 0 ? F.Dropout(x, Dropout, Training, DropoutSeed) : x;
            return baseOutput.IndexAdd(baseOutput.Dim - 1, Index, F.Linear(xm, f) * Scaling);
        }
        if (Fa)
        {
            // Selecting before the cast and dropout touches r features, not in; dropping after selecting draws the
            // same distribution as dropping x and then multiplying by the one-hot A.
            var h = x.IndexSelect(x.Dim - 1, Index);
            if (h.DType != ScalarType.Float32) h = h.To(ScalarType.Float32);
            if (Dropout > 0) h = F.Dropout(h, Dropout, Training, DropoutSeed);
            return AdapterInput.AddInto(baseOutput, F.Linear(h, Scaling == 1 ? Factor : Factor * Scaling));
        }
        var hx = AdapterInput.As(x, ScalarType.Float32);   // one cast per input shared by several modules
        if (Dropout > 0) hx = F.Dropout(hx, Dropout, Training, DropoutSeed);
        var delta = F.Linear(hx, Factor) * Scaling;
        return baseOutput.IndexAdd(baseOutput.Dim - 1, Index, delta.DType == baseOutput.DType ? delta : delta.To(baseOutput.DType));
    }

    /// <summary>ΔW (out, in) in fp32: s·B in the columns idx (FA) or s·A in the rows idx (FB), zero elsewhere.</summary>
    public Tensor DeltaWeight()
    {
        using var zeros = Tensor.Zeros([Base.OutFeatures, Base.InFeatures], ScalarType.Float32, Factor.Device);
        return zeros.IndexAdd(Fa ? 1 : 0, Index, Factor.Detach() * Scaling);
    }

    /// <summary>The frozen factor as one-hot rows, on the CPU: FA's A (r, in) with A[j, idx[j]] = 1, FB's B (out, r) with B[idx[j], j] = 1.</summary>
    public Tensor OneHot()
    {
        var idx = Index.ToArray<long>();
        var r = idx.Length;
        if (Fa)
        {
            var inF = Base.InFeatures;
            var a = new float[r * inF];
            for (var j = 0; j < r; j++) a[j * inF + idx[j]] = 1f;
            return Tensor.From(a, r, inF);
        }
        var outF = Base.OutFeatures;
        var b = new float[outF * r];
        for (var j = 0; j < r; j++) b[idx[j] * r + j] = 1f;
        return Tensor.From(b, outF, r);
    }

    /// <summary>Indices read from a file must be r distinct values in [0, extent).</summary>
    public void CheckIndex(string path)
    {
        var idx = Index.ToArray<long>();
        if (idx.Any(i => i < 0 || i >= Extent) || idx.Distinct().Count() != idx.Length)
            throw new InvalidDataException($"{path}.sbora_idx must hold {idx.Length} distinct indices in [0, {Extent}), got [{string.Join(", ", idx.Take(8))}{(idx.Length > 8 ? ", …" : "")}]");
    }

    public void Dispose()
    {
        Factor.Dispose();
        Index.Dispose();
    }
}

public sealed class SboraAdapter(SboraMethod spec) : AdapterMethodBase(spec)
{
    public SboraMethod Sbora { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new SboraLayer(linear, Sbora.Fa, Sbora.R, Sbora.Scaling, Sbora.Dropout, gen);

    protected override void AfterLoad()
    {
        foreach (var (path, layer) in Layers) ((SboraLayer)layer).CheckIndex(path);
    }

    /// <summary>Our own form (PEFT has no SBoRA type), documented in docs/methods.md: <c>peft_type: "SBORA"</c>, the
    /// variant, r, alpha, dropout and every module's indices; tensors <c>…sbora_B.weight (out, r)</c> (fa) or
    /// <c>…sbora_A.weight (r, in)</c> (fb) and <c>…sbora_idx (r)</c> int64.</summary>
    protected override JsonObject AdapterConfig(string baseModelName)
    {
        var c = AdapterFiles.CommonConfig("SBORA", baseModelName, TargetModules);
        c["variant"] = Sbora.Variant;
        c["r"] = Sbora.R;
        c["lora_alpha"] = Sbora.Alpha;
        c["lora_dropout"] = Sbora.Dropout;
        c["index_dim"] = Sbora.Fa ? "in" : "out";
        var indices = new JsonObject();
        foreach (var (path, layer) in Layers)
            indices[path] = new JsonArray(((SboraLayer)layer).Index.ToArray<long>().Select(i => (JsonNode)i).ToArray());
        c["indices"] = indices;
        return c;
    }

    /// <summary>The exact plain-LoRA form: the frozen factor as one-hot rows, the trained one scaled by s (ΔW = B·A).</summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        var modules = new List<LoraExport.Module>();
        foreach (var (path, layer) in Layers)
        {
            var s = (SboraLayer)layer;
            var trained = s.Factor.Detach() * s.Scaling;
            modules.Add(s.Fa ? new LoraExport.Module(path, s.OneHot(), trained) : new LoraExport.Module(path, trained, s.OneHot()));
        }
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info,
            note: $"SBoRA-{Sbora.Variant.ToUpperInvariant()}: the frozen standard-basis factor as one-hot rows (indices in adapter_config.json)");
        ExportInfo = info;
        return files;
    }
}
