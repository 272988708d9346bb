using System.Text.Json.Nodes;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods.Lora;

namespace FineTune.Worker.Training.Methods;

/// <summary>
/// The portable artifact every method ships beside its native form: a plain PEFT LoRA in <c>lora/</c> that vLLM and
/// LoRAX load (<c>peft_type</c> LORA, no DoRA, <c>bias: "none"</c>). Factors are given with the scale folded in
/// (ΔW = B·A exactly), so the config says <c>lora_alpha = r</c> (s = 1). Modules of a lower rank are zero-padded to the
/// common rank: the same ΔW, and no <c>rank_pattern</c>, which vLLM ignores.
/// </summary>
public static class LoraExport
{
    public const string Dir = "lora";

    /// <summary>One module's factors: A (r, in), B (out, r), ΔW = B·A. <paramref name="RelativeError"/> is
    /// ‖ΔW_true − B·A‖_F / ‖ΔW_true‖_F when the form is an approximation (SVD truncation), null when exact.</summary>
    public sealed record Module(string Path, Tensor A, Tensor B, double? RelativeError = null);

    /// <summary>Writes <c>&lt;adapterDir&gt;/lora/</c>; returns the files written relative to <paramref name="adapterDir"/>
    /// and sets <paramref name="info"/> to what metadata.json records about the export.</summary>
    public static IReadOnlyList<string> Write(string adapterDir, string baseModelName, string[] targetModules,
                                              IReadOnlyList<Module> modules, out JsonObject info, string? note = null)
    {
        var dir = Path.Combine(adapterDir, Dir);
        Directory.CreateDirectory(dir);
        var rank = Math.Max(1, modules.Count == 0 ? 1 : modules.Max(m => m.A.Size(0)));
        using (DisposeScope.Begin())
        using (Torch.Torch.NoGrad())
        {
            var tensors = new Dictionary<string, Tensor>();
            foreach (var m in modules)
            {
                var r = m.A.Size(0);
                if (m.B.Size(1) != r) throw new ArgumentException($"{m.Path}: A has rank {r}, B has {m.B.Size(1)}");
                var a = m.A.Detach().To(Device.Cpu, ScalarType.Float32);
                var b = m.B.Detach().To(Device.Cpu, ScalarType.Float32);
                if (r < rank)
                {
                    a = a.Pad([0, 0, 0, rank - r]);     // zero rows of A
                    b = b.Pad([0, rank - r]);           // zero columns of B
                }
                tensors[$"{AdapterMethodBase.Prefix}{m.Path}.lora_A.weight"] = a.Contiguous();
                tensors[$"{AdapterMethodBase.Prefix}{m.Path}.lora_B.weight"] = b.Contiguous();
            }
            Safetensors.Save(Path.Combine(dir, AdapterFiles.Weights), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        }
        AdapterFiles.WriteJson(Path.Combine(dir, AdapterFiles.Config),
            LoraAdapter.LoraConfig(baseModelName, targetModules, (int)rank, rank, 0.0, rslora: false));

        var approximate = modules.Where(m => m.RelativeError is not null).ToList();
        info = new JsonObject
        {
            ["dir"] = Dir,
            ["r"] = rank,
            ["lora_alpha"] = rank,
            ["exact"] = approximate.Count == 0,
        };
        if (approximate.Count > 0)
        {
            info["max_relative_error"] = approximate.Max(m => m.RelativeError!.Value);
            info["mean_relative_error"] = approximate.Average(m => m.RelativeError!.Value);
            var per = new JsonObject();
            foreach (var m in approximate) per[m.Path] = m.RelativeError!.Value;
            info["relative_error"] = per;
        }
        if (note is not null) info["note"] = note;
        return [$"{Dir}/{AdapterFiles.Weights}", $"{Dir}/{AdapterFiles.Config}"];
    }

    /// <summary>
    /// The best rank-<paramref name="rank"/> factors of <paramref name="delta"/> (out, in) by truncated SVD in fp32:
    /// B = U_r·√S_r, A = √S_r·V_rᵀ, and the relative Frobenius error of that approximation. A rank at or above
    /// min(out, in) is exact (error 0 up to rounding).
    /// </summary>
    public static Module FromDelta(string path, Tensor delta, int rank)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.Torch.NoGrad();
        var d = delta.Detach().To(ScalarType.Float32);
        var r = (int)Math.Min(rank, Math.Min(d.Size(0), d.Size(1)));
        var (u, s, vh) = Linalg.Svd(d);
        var root = s.Narrow(0, 0, r).Sqrt();
        var b = u.Narrow(1, 0, r) * root.Unsqueeze(0);
        var a = root.Unsqueeze(1) * vh.Narrow(0, 0, r);
        var norm = d.Norm().ItemDouble();
        var error = norm == 0 ? 0.0 : (d - b.MatMul(a)).Norm().ItemDouble() / norm;
        return new Module(path, a.MoveToOuterScope(), b.MoveToOuterScope(), error);
    }
}
