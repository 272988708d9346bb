using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Domain.Tokenizers;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training;

/// <summary>
/// Inputs for the PEFT parity check (<c>scripts/peft_parity.py</c>, run where PyTorch, transformers and PEFT are
/// installed): a tiny model folder, and per case an adapter folder as a finished job writes it (native form,
/// <c>lora/</c>, <c>merged/</c>) with adapter tensors moved away from their init as training would, plus our logits for
/// fixed ids. The script loads each folder with PEFT / transformers and compares. Add a method: one line in
/// <see cref="Cases"/>.
/// </summary>
public static class ParityCases
{
    private static readonly string[] All = MethodSpec.AllModules;

    public static readonly IReadOnlyList<(string Name, MethodSpec Method)> Cases =
    [
        ("lora", new LoraMethod { R = 8, Alpha = 16, TargetModules = All }),
        ("lora-gaussian-rslora", new LoraMethod { R = 8, Alpha = 16, Rslora = true, Init = "gaussian", TargetModules = ["q_proj", "v_proj", "down_proj"] }),
        ("pissa", new LoraMethod { R = 8, Alpha = 16, Init = "pissa", TargetModules = All }),
        ("olora", new LoraMethod { R = 8, Alpha = 8, Init = "olora", TargetModules = ["q_proj", "k_proj", "up_proj"] }),
        ("dora", new DoraMethod { R = 8, Alpha = 16, TargetModules = All }),
        ("dora-rslora", new DoraMethod { R = 4, Alpha = 8, Rslora = true, Init = "gaussian", TargetModules = ["o_proj", "gate_proj"] }),
    ];

    /// <summary>Token ids (2, 24) every case is evaluated on.</summary>
    public static Tensor Ids()
    {
        var ids = new long[2 * 24];
        for (var i = 0; i < ids.Length; i++) ids[i] = (i * 37 + 11) % 256;
        ids[0] = ids[24] = 256;   // BOS
        return Tensor.From(ids, 2, 24);
    }

    /// <summary>Writes <c>model/</c>, <c>base.safetensors</c> and one folder per case into <paramref name="dir"/>;
    /// returns the manifest it writes as manifest.json.</summary>
    public static JsonObject Write(string dir, IEnumerable<(string Name, MethodSpec Method)>? cases = null)
    {
        var modelDir = Path.Combine(dir, "model");
        TinyModel.Write(modelDir, seed: 1234);
        TinyTokenizer.WriteFiles(modelDir);
        using var scope = DisposeScope.Begin();
        var ids = Ids();
        using (var plain = Llama.Load(modelDir, Device.Cpu, ScalarType.Float32))
        using (Torch.Torch.NoGrad())
            Save(Path.Combine(dir, "base.safetensors"), ids, plain.Forward(ids));

        var list = new JsonArray();
        foreach (var (name, spec) in cases ?? Cases)
        {
            var caseDir = Path.Combine(dir, name);
            using var model = Llama.Load(modelDir, Device.Cpu, ScalarType.Float32);
            using var method = AdapterMethods.Attach(spec, model, seed: 5);
            Perturb(method, seed: name.Length * 7919L);
            method.Train(false);
            method.Save(caseDir, "model");
            MergedModel.Write(caseDir, model, method, modelDir, out _);
            using (Torch.Torch.NoGrad())
                Save(Path.Combine(caseDir, "expected.safetensors"), ids, model.Forward(ids));
            list.Add(new JsonObject
            {
                ["name"] = name,
                ["type"] = spec.Type,
                ["lora_export_exact"] = method.ExportInfo?["exact"]?.DeepClone(),
                ["lora_export_max_relative_error"] = method.ExportInfo?["max_relative_error"]?.DeepClone(),
            });
        }
        var manifest = new JsonObject { ["model"] = "model", ["base"] = "base.safetensors", ["cases"] = list };
        AdapterFiles.WriteJson(Path.Combine(dir, "manifest.json"), manifest);
        return manifest;
    }

    /// <summary>Moves every adapter tensor off its init as training would: t += N(0, 1)·(10% of its rms, or 0.05 for a
    /// zero tensor), so each adapter changes the logits well beyond the check's tolerance.</summary>
    public static void Perturb(IAdapterMethod method, long seed)
    {
        using var gen = new Generator(seed);
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var (_, t) in method.TrainableTensors)
        {
            using var scope = DisposeScope.Begin();
            var rms = t.Square().Mean().Sqrt().ItemDouble();
            t.Add_(Tensor.Randn(t.Shape, gen).To(t.Device, t.DType), rms > 0 ? 0.1 * rms : 0.05);
        }
    }

    private static void Save(string path, Tensor ids, Tensor logits) =>
        Safetensors.Save(path, new Dictionary<string, Tensor> { ["ids"] = ids, ["logits"] = logits.Detach().Contiguous() });
}
