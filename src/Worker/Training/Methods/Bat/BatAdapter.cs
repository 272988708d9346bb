using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods.Lora;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.Bat;

/// <summary>
/// Bat on one linear: W (out, in) is cut into r×r blocks W_{o,a} and each becomes W'_{o,a} = W_{o,a}(I + D_o) + D_o
/// (grouping col, PEFT's bat, D (out/r, r, r)) or (I + D_a)W_{o,a} + D_a (grouping row, D (in/r, r, r)); D starts at zero.
/// Training runs <see cref="AdapterOps.BatLinear"/>: one matmul with W' built transiently in the compute dtype and
/// rebuilt in backward, instead of PEFT's fp32 W' kept alive per layer until backward. <see cref="Adapted"/> is the
/// reference formula in plain tensor ops (PEFT's reshape/permute), used for merging and by the tests.
/// </summary>
public sealed class BatLayer : IAdapterLayer, IWholeLinearAdapter
{
    public Linear Base { get; }
    public int R { get; }
    public BatGrouping Grouping { get; }
    public Tensor D { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [(Suffix(Grouping), D)];

    /// <summary>PEFT's name for the col block; our own for row, so PEFT never mistakes a row block for its bat.</summary>
    public static string Suffix(BatGrouping g) => g == BatGrouping.Col ? "miss_block" : "bat_block";

    public BatLayer(Linear linear, int r, BatGrouping grouping)
    {
        (Base, R, Grouping) = (linear, r, grouping);
        var (outF, inF) = (linear.OutFeatures, linear.InFeatures);
        if (outF % r != 0 || inF % r != 0)
            throw new ArgumentException($"bat: r={r} must divide both sizes of a ({outF}, {inF}) module");
        var blocks = (grouping == BatGrouping.Col ? outF : inF) / r;
        D = LoraLayer.Owned(Tensor.Zeros([blocks, r, r], ScalarType.Float32, linear.Weight.Device));
    }

    public Tensor? ForwardWhole(Tensor x) => Merged ? null : AdapterOps.BatLinear(x, Base.Weight, Base.Bias, D, Grouping);

    /// <summary>Only reached when merged (or when called directly): base output plus x·ΔWᵀ.</summary>
    public Tensor Forward(Tensor x, Tensor baseOutput) =>
        Merged ? baseOutput : baseOutput + F.Linear(x, DeltaWeight().To(x.DType));

    /// <summary>ΔW (out, in) in fp32, also while merged (then W is recovered from W' first).</summary>
    public Tensor DeltaWeight()
    {
        var w = Base.Weight.Detach().To(ScalarType.Float32);
        var d = D.Detach().To(ScalarType.Float32);   // bf16 with adapterDtype bf16
        if (Merged) w = Restored(w, d, Grouping);
        return Adapted(w, d, Grouping) - w;
    }

    /// <summary>W' for W (out, in) and D, as PEFT computes it: W_b = W.reshape(out/r, r, in/r, r).permute(2, 0, 1, 3),
    /// col: W_b @ D + D (D broadcast over the input blocks), row: D @ W_b + D (broadcast over the output blocks).</summary>
    public static Tensor Adapted(Tensor w, Tensor d, BatGrouping g)
    {
        var (blocks, outF, inF, _) = Blocks(w, d);
        var delta = g == BatGrouping.Col ? blocks.MatMul(d) + d : d.Unsqueeze(1).MatMul(blocks) + d.Unsqueeze(1);
        return w + delta.Permute(1, 2, 0, 3).Reshape(outF, inF);
    }

    /// <summary>The inverse of <see cref="Adapted"/> per block, in fp32: col W = (W' − D)(I + D)⁻¹, row W = (I + D)⁻¹(W' − D).</summary>
    public static Tensor Restored(Tensor wPrime, Tensor d, BatGrouping g)
    {
        var d32 = d.To(ScalarType.Float32);
        var (blocks, outF, inF, r) = Blocks(wPrime.To(ScalarType.Float32), d32);
        var inv = Linalg.Inverse(Eye(r, d.Device) + d32);
        var w = g == BatGrouping.Col ? (blocks - d32).MatMul(inv) : inv.Unsqueeze(1).MatMul(blocks - d32.Unsqueeze(1));
        return w.Permute(1, 2, 0, 3).Reshape(outF, inF);
    }

    private static (Tensor Blocks, long Out, long In, long R) Blocks(Tensor w, Tensor d)
    {
        var (outF, inF, r) = (w.Size(0), w.Size(1), d.Size(-1));
        return (w.Reshape(outF / r, r, inF / r, r).Permute(2, 0, 1, 3), outF, inF, r);
    }

    private static Tensor Eye(long r, Device device)
    {
        var eye = new float[r * r];
        for (var i = 0; i < r; i++) eye[i * r + i] = 1f;
        using var cpu = Tensor.From(eye, r, r);
        return cpu.To(device);
    }

    public void Dispose() => D.Dispose();
}

public sealed class BatAdapter(BatMethod spec) : AdapterMethodBase(spec)
{
    public BatMethod Bat { get; } = spec;
    private BatGrouping Grouping => Bat.Row ? BatGrouping.Row : BatGrouping.Col;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) => new BatLayer(linear, Bat.R, Grouping);

    protected override Tensor MergedWeight(IAdapterLayer layer, Tensor weight, bool merge)
    {
        var d = ((BatLayer)layer).D.Detach().To(ScalarType.Float32);
        return merge ? BatLayer.Adapted(weight, d, Grouping) : BatLayer.Restored(weight, d, Grouping);
    }

    /// <summary>Col: PEFT's MISS config with <c>init_weights: "bat"</c>. Row has no PEFT type: our own
    /// <c>peft_type: "BAT"</c> with <c>grouping: "row"</c> and tensors <c>…bat_block (in/r, r, r)</c> (docs/methods.md).</summary>
    protected override JsonObject AdapterConfig(string baseModelName)
    {
        if (!Bat.Row)
        {
            var c = AdapterFiles.CommonConfig("MISS", baseModelName, TargetModules);
            c["r"] = Bat.R;
            c["init_weights"] = "bat";
            c["mini_r"] = 1;
            c["miss_dropout"] = 0.0;
            return c;
        }
        var row = AdapterFiles.CommonConfig("BAT", baseModelName, TargetModules);
        row["r"] = Bat.R;
        row["grouping"] = "row";
        row["block"] = "bat_block (in/r, r, r)";
        row["formula"] = "W'[o,a] = (I + D[a]) W[o,a] + D[a] for the r x r blocks W[o,a] = W[o*r:(o+1)*r, a*r:(a+1)*r]";
        return row;
    }

    /// <summary>Bat's ΔW has full rank in general, so the plain-LoRA export is its SVD truncated to rank r (the block
    /// size: a LoRA of rank r holds r·(in+out) values, about twice Bat's out·r on a square module); the relative
    /// Frobenius error of every module goes into the metadata.</summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        var modules = Layers.Select(kv => LoraExport.FromDelta(kv.Key, kv.Value.DeltaWeight(), Bat.R)).ToList();
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info,
            note: $"SVD truncation of Bat's ΔW to rank {Bat.R} (the block size); see relative_error");
        ExportInfo = info;
        return files;
    }
}
