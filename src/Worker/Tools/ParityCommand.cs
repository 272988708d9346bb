using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tools;

/// <summary>
/// <c>FineTune.Worker parity --model DIR --ids FILE --out DIR [--device cpu|cuda] [--seed N] [--methods a,b]</c>:
/// what tests/parity/ compares against transformers and PEFT. Writes, in fp32:
/// <list type="bullet">
/// <item><c>base.logits.safetensors</c>: our logits (B, T, V) for the ids (a JSON array of equal-length rows);</item>
/// <item>for every registered method the worker can train (<see cref="MethodSpec.Registered"/>, options fitted to the
/// model): <c>adapters/&lt;type&gt;/</c> (the native form and <c>lora/</c>) with every adapter tensor set to seeded
/// random non-zero values, <c>&lt;type&gt;.logits.safetensors</c> (our logits with it) and, when the method exports
/// <c>lora/</c>, <c>&lt;type&gt;.lora.logits.safetensors</c> (our logits with that export loaded as a plain LoRA);</item>
/// <item><c>manifest.json</c>: files, the options used, each export's exactness, and the methods skipped and why.</item>
/// </list>
/// </summary>
public static class ParityCommand
{
    public const string Usage = "parity --model <dir> --ids <ids.json> --out <dir> [--device cpu|cuda[:n]] [--seed <n>] [--methods <a,b>]";
    private const double Noise = 0.05;

    public static int Run(string[] args)
    {
        Dictionary<string, string> options;
        try { options = ParseOptions(args); }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"{e.Message}\nusage: FineTune.Worker {Usage}");
            return 2;
        }
        try
        {
            var manifest = Execute(options["model"], options["ids"], options["out"],
                Device.Parse(options.GetValueOrDefault("device", "cpu")), long.Parse(options.GetValueOrDefault("seed", "1234")),
                options.TryGetValue("methods", out var m) ? m.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : null);
            Console.WriteLine(manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        catch (Exception e) when (e is IOException or InvalidDataException or SafetensorsException or TorchException
                                      or JsonException or ArgumentException or FormatException)
        {
            Console.Error.WriteLine($"parity: {e.Message}");
            return 1;
        }
    }

    private static Dictionary<string, string> ParseOptions(string[] args)
    {
        var options = new Dictionary<string, string>();
        for (var i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--") || i + 1 >= args.Length) throw new ArgumentException($"unexpected argument '{args[i]}'");
            options[args[i][2..]] = args[++i];
        }
        foreach (var required in new[] { "model", "ids", "out" })
            if (!options.ContainsKey(required)) throw new ArgumentException($"--{required} is required");
        return options;
    }

    /// <summary>Runs the whole comparison set for one model folder; returns the manifest it wrote.</summary>
    public static JsonObject Execute(string modelDir, string idsFile, string outDir, Device device, long seed, string[]? only = null)
    {
        Directory.CreateDirectory(outDir);
        using var model = Llama.Load(modelDir, device, ScalarType.Float32);
        model.Eval();
        var rows = ReadIds(idsFile, model.Config.VocabSize);
        using var ids = Tensor.From(rows.SelectMany(r => r).ToArray(), rows.Length, rows[0].Length).To(device);

        var manifest = new JsonObject
        {
            ["model"] = Path.GetFullPath(modelDir),
            ["architecture"] = model.Config.Architectures[0],
            ["device"] = device.ToString(),
            ["seed"] = seed,
            ["ids_shape"] = new JsonArray(rows.Length, rows[0].Length),
            ["base_logits"] = WriteLogits(model, ids, Path.Combine(outDir, "base.logits.safetensors")),
        };
        var methods = new JsonArray();
        var skipped = new JsonArray();
        foreach (var (type, _) in MethodSpec.Registered)
        {
            if (only is not null && !only.Contains(type)) continue;
            var spec = MethodSpec.Default(type);
            if (!AdapterMethods.IsSupported(spec))
            {
                skipped.Add(new JsonObject { ["type"] = type, ["reason"] = "registered but not trainable by this worker" });
                continue;
            }
            MethodSpec fitted;
            try { fitted = Fit(spec, model.Config.LayerLinears()); }
            catch (ArgumentException e)
            {
                skipped.Add(new JsonObject { ["type"] = type, ["reason"] = e.Message });
                continue;
            }
            methods.Add(RunMethod(model, ids, fitted, outDir, seed, modelDir));
        }
        manifest["methods"] = methods;
        manifest["skipped"] = skipped;
        AdapterFiles.WriteJson(Path.Combine(outDir, "manifest.json"), manifest);
        return manifest;
    }

    private static JsonObject RunMethod(Llama model, Tensor ids, MethodSpec spec, string outDir, long seed, string modelDir)
    {
        var type = spec.Type;
        var adapterDir = Path.Combine(outDir, "adapters", type);
        if (Directory.Exists(adapterDir)) Directory.Delete(adapterDir, recursive: true);
        var entry = new JsonObject
        {
            ["type"] = type,
            ["options"] = JsonSerializer.SerializeToNode(spec, DomainJson.Options),
            ["adapter_dir"] = Path.Combine("adapters", type),
        };
        using (var method = AdapterMethods.Attach(spec, model, seed))
        {
            Randomize(method, seed + 1);
            method.Train(false);
            entry["logits"] = WriteLogits(model, ids, Path.Combine(outDir, $"{type}.logits.safetensors"));
            entry["files"] = new JsonArray(method.Save(adapterDir, Path.GetFullPath(modelDir)).Select(f => (JsonNode)f).ToArray());
            entry["trainable_parameters"] = method.TrainableParameterCount;
            entry["export"] = method.ExportInfo?.DeepClone();
        }
        var loraDir = Path.Combine(adapterDir, LoraExport.Dir);
        if (File.Exists(Path.Combine(loraDir, AdapterFiles.Config)))
            entry["lora_logits"] = WithLoraExport(model, ids, loraDir, Path.Combine(outDir, $"{type}.lora.logits.safetensors"), seed);
        return entry;
    }

    /// <summary>Our logits with a lora/ export loaded as a plain LoRA (r and lora_alpha from its adapter_config.json).</summary>
    private static string WithLoraExport(Llama model, Tensor ids, string loraDir, string path, long seed)
    {
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(loraDir, AdapterFiles.Config)))!;
        var spec = new LoraMethod
        {
            R = config["r"]!.GetValue<int>(),
            Alpha = config["lora_alpha"]!.GetValue<double>(),
            TargetModules = config["target_modules"]!.AsArray().Select(t => t!.GetValue<string>()).ToArray(),
        };
        // Not AdapterMethods.Attach: an export's rank may exceed a module's smaller side (Bone's r=64 on a 32-wide
        // k_proj), which a LoRA job would refuse and PEFT loads as it is.
        using var lora = new Training.Methods.Lora.LoraAdapter(spec);
        lora.Attach(model, seed);
        lora.Load(loraDir);
        lora.Train(false);
        return WriteLogits(model, ids, path);
    }

    /// <summary>
    /// The method's defaults on every linear module, with integer options halved while the model's shapes reject them
    /// (an error on <c>method.r</c> halves <c>R</c>): the tiny parity models are far smaller than the defaults assume.
    /// </summary>
    public static MethodSpec Fit(MethodSpec spec, IReadOnlyList<ModuleShape> shapes)
    {
        var all = Clone(spec);
        typeof(MethodSpec).GetProperty(nameof(MethodSpec.TargetModules))!.SetValue(all, MethodSpec.AllModules.ToArray());
        if (!all.Validate().Any(e => e.Field.EndsWith(".targetModules"))) spec = all;
        for (var round = 0; round < 16; round++)
        {
            var errors = spec.Validate().Concat(spec.ValidateShapes(shapes)).ToList();
            if (errors.Count == 0) return spec;
            var next = Clone(spec);
            var changed = false;
            foreach (var field in errors.Select(e => e.Field).Distinct())
            {
                var name = field[(field.LastIndexOf('.') + 1)..];
                var property = spec.GetType().GetProperties(BindingFlags.Public | BindingFlags.Instance)
                    .FirstOrDefault(p => p.PropertyType == typeof(int) && p.CanWrite && JsonNamingPolicy.CamelCase.ConvertName(p.Name) == name);
                if (property?.GetValue(next) is int value && value > 1)
                {
                    property.SetValue(next, value / 2);
                    changed = true;
                }
            }
            if (!changed)
                throw new ArgumentException($"no options of '{spec.Type}' fit this model: {string.Join("; ", errors.Select(e => $"{e.Field}: {e.Error}"))}");
            spec = next;
        }
        throw new ArgumentException($"no options of '{spec.Type}' fit this model");
    }

    private static MethodSpec Clone(MethodSpec spec) =>
        JsonSerializer.Deserialize<MethodSpec>(JsonSerializer.Serialize(spec, DomainJson.Options), DomainJson.Options)!;

    /// <summary>Adds seeded N(0, 0.05²) noise to every adapter tensor, so that zero-initialised parts (LoRA's B, Bone's
    /// block) are non-zero and the comparison tests the adapter's math, not its init.</summary>
    private static void Randomize(IAdapterMethod method, long seed)
    {
        using var gen = new Generator(seed);
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var (_, t) in method.TrainableTensors)
        {
            using var scope = DisposeScope.Begin();
            t.Add_((Tensor.Randn(t.Shape, gen) * Noise).To(t.Device, t.DType));
        }
    }

    private static string WriteLogits(Llama model, Tensor ids, string path)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.Torch.NoGrad();
        var logits = model.Forward(ids).To(Device.Cpu, ScalarType.Float32).Contiguous();
        Safetensors.Save(path, new Dictionary<string, Tensor> { ["logits"] = logits, ["input_ids"] = ids.To(Device.Cpu) },
            new Dictionary<string, string> { ["format"] = "pt" });
        return Path.GetFileName(path);
    }

    private static long[][] ReadIds(string path, int vocabSize)
    {
        var rows = JsonSerializer.Deserialize<long[][]>(File.ReadAllText(path))
                   ?? throw new InvalidDataException($"{path}: expected a JSON array of rows of token ids");
        if (rows.Length == 0 || rows[0].Length == 0 || rows.Any(r => r.Length != rows[0].Length))
            throw new InvalidDataException($"{path}: the rows must be non-empty and of equal length");
        if (rows.SelectMany(r => r).FirstOrDefault(id => id < 0 || id >= vocabSize, -1) is var bad and not -1)
            throw new InvalidDataException($"{path}: token id {bad} is outside the model's vocabulary ({vocabSize})");
        return rows;
    }
}
