using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tools;

/// <summary>
/// One adapter configuration the parity run checks: a method's options (fitted to the model by
/// <see cref="ParityCommand.Fit"/>) and how many optimizer steps of the method's after-step hook to replay (XGBLoRA
/// merges a booster per round, so its artifact needs rounds to be a sum of boosters).
/// </summary>
public sealed record ParityCase(string Name, MethodSpec Method, int Steps = 0);

/// <summary>
/// <c>FineTune.Worker parity (--model DIR --ids FILE | --models DIR) --out DIR [--device cpu|cuda] [--seed N]
/// [--cases a,b]</c>: what tests/parity/ compares against transformers and PEFT. Writes, in fp32, per model:
/// <list type="bullet">
/// <item><c>base.logits.safetensors</c>: our logits (B, T, V) for the ids (a JSON array of equal-length rows);</item>
/// <item>for every <see cref="Cases"/> entry: <c>adapters/&lt;case&gt;/</c> as a finished job writes it (the native
/// form, <c>lora/</c>, <c>merged/</c>, and metadata.json's <c>lora_export</c> and <c>merged</c> records) with every adapter
/// tensor moved off its init by seeded noise, <c>&lt;case&gt;.logits.safetensors</c> (our logits with the adapter),
/// <c>&lt;case&gt;.lora.logits.safetensors</c> (ours with the lora/ export loaded as a plain LoRA on the original base)
/// and <c>&lt;case&gt;.merged.logits.safetensors</c> (ours with merged/ loaded as a model);</item>
/// <item><c>manifest.json</c>: files, the options used, each export's exactness, and cases skipped or failed and why.</item>
/// </list>
/// With <c>--models DIR</c> every subfolder of DIR holding config.json and ids.json is one model, written to
/// <c>OUT/&lt;name&gt;/</c>, in one process (one CUDA start for all).
/// </summary>
public static class ParityCommand
{
    public const string Usage = "parity (--model <dir> --ids <ids.json> | --models <dir>) --out <dir> [--device cpu|cuda[:n]] [--seed <n>] [--cases <a,b>]";
    private const double Noise = 0.05;

    /// <summary>
    /// Every registered method with each variant PEFT distinguishes (LoRA's inits and rsLoRA, DoRA, Bone's modes,
    /// Bat's groupings, SBoRA's variants, VB-LoRA's top-k form). Options start at the method's defaults; the test
    /// <c>ParityCommandTests</c> fails when a registered method has no case. LoRA+ changes only the optimizer, so it
    /// has none.
    /// </summary>
    public static readonly IReadOnlyList<ParityCase> Cases =
    [
        new("lora", new LoraMethod()),
        new("lora-gaussian", new LoraMethod { Init = LoraFamilyMethod.InitGaussian }),
        new("lora-rslora", new LoraMethod { Rslora = true, Alpha = 8 }),
        new("lora-pissa", new LoraMethod { Init = LoraFamilyMethod.InitPissa }),
        new("lora-olora", new LoraMethod { Init = LoraFamilyMethod.InitOlora }),
        new("dora", new DoraMethod()),
        new("dora-rslora", new DoraMethod { Rslora = true, Init = LoraFamilyMethod.InitGaussian }),
        // r = 48 divides no module's input size: MiSS's zero-padded last chunk.
        new("bone", new BoneMethod { R = 48 }),
        new("bone-mini", new BoneMethod { R = 16, Mode = "mini", MiniR = 8 }),
        new("bat", new BatMethod()),
        new("bat-row", new BatMethod { Grouping = "row" }),
        new("sbora-fa", new SboraMethod()),
        new("sbora-fb", new SboraMethod { Variant = "fb" }),
        new("vblora", new VbLoraMethod()),
        new("vblora-topk", new VbLoraMethod { SaveOnlyTopkWeights = true }),
        new("xgblora", new XgbLoraMethod { LayersPerRound = 1, StepsPerRound = 1 }, Steps: 3),
    ];

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
            var device = Device.Parse(options.GetValueOrDefault("device", "cpu"));
            var seed = long.Parse(options.GetValueOrDefault("seed", "1234"));
            var only = options.TryGetValue("cases", out var c) ? c.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : null;
            var models = options.TryGetValue("models", out var root)
                ? Directory.GetDirectories(root).Order(StringComparer.Ordinal)
                    .Where(d => File.Exists(Path.Combine(d, "config.json")) && File.Exists(Path.Combine(d, "ids.json")))
                    .Select(d => (Dir: d, Ids: Path.Combine(d, "ids.json"), Out: Path.Combine(options["out"], Path.GetFileName(d)))).ToList()
                : [(Dir: options["model"], Ids: options["ids"], Out: options["out"])];
            if (models.Count == 0) throw new ArgumentException($"no model folders (config.json + ids.json) under {root}");
            var status = 0;
            foreach (var (dir, ids, outDir) in models)
            {
                try
                {
                    var manifest = Execute(dir, ids, outDir, device, seed, only);
                    var failed = manifest["failed"]!.AsArray();
                    Console.WriteLine($"{Path.GetFileName(Path.TrimEndingDirectorySeparator(dir))}: {manifest["cases"]!.AsArray().Count} cases, " +
                                      $"{manifest["skipped"]!.AsArray().Count} skipped, {failed.Count} failed -> {outDir}");
                    foreach (var f in failed) Console.Error.WriteLine($"  {f!["name"]}: {f["error"]}");
                    if (failed.Count > 0) status = 1;
                }
                catch (Exception e) when (IsDataError(e))
                {
                    // One broken model folder must not hide the others' results.
                    Console.Error.WriteLine($"parity: {dir}: {e.Message}");
                    status = 1;
                }
            }
            return status;
        }
        catch (Exception e) when (IsDataError(e))
        {
            Console.Error.WriteLine($"parity: {e.Message}");
            return 1;
        }
    }

    private static bool IsDataError(Exception e) =>
        e is IOException or InvalidDataException or SafetensorsException or TorchException or JsonException or ArgumentException
            or FormatException or UnauthorizedAccessException;

    private static Dictionary<string, string> ParseOptions(string[] args)
    {
        var options = new Dictionary<string, string>();
        for (var i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--") || i + 1 >= args.Length) throw new ArgumentException($"unexpected argument '{args[i]}'");
            options[args[i][2..]] = args[++i];
        }
        if (!options.ContainsKey("out")) throw new ArgumentException("--out is required");
        if (options.ContainsKey("models"))
        {
            if (options.ContainsKey("model") || options.ContainsKey("ids")) throw new ArgumentException("--models replaces --model and --ids");
        }
        else
            foreach (var required in new[] { "model", "ids" })
                if (!options.ContainsKey(required)) throw new ArgumentException($"--{required} is required (or --models)");
        if (options.TryGetValue("cases", out var cases))
            foreach (var c in cases.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                if (!Cases.Any(k => k.Name == c || k.Method.Type == c))
                    throw new ArgumentException($"--cases: unknown case or method '{c}'; known: {string.Join(", ", Cases.Select(k => k.Name))}");
        return options;
    }

    /// <summary>Runs the cases (all, or those named or of a method named in <paramref name="only"/>) for one model
    /// folder; returns the manifest it wrote. A case that fails is recorded under <c>failed</c>, not thrown.</summary>
    public static JsonObject Execute(string modelDir, string idsFile, string outDir, Device device, long seed, string[]? only = null)
    {
        Directory.CreateDirectory(outDir);
        var config = ModelConfig.Load(modelDir);
        var rows = ReadIds(idsFile, config.VocabSize);
        using var ids = Tensor.From(rows.SelectMany(r => r).ToArray(), rows.Length, rows[0].Length).To(device);

        var manifest = new JsonObject
        {
            ["model"] = Path.GetFullPath(modelDir),
            ["architecture"] = config.Architectures[0],
            ["device"] = device.ToString(),
            ["seed"] = seed,
            ["ids_shape"] = new JsonArray(rows.Length, rows[0].Length),
        };
        using (var model = LoadModel(modelDir, device))
            manifest["base_logits"] = WriteLogits(model, ids, Path.Combine(outDir, "base.logits.safetensors"));
        var cases = new JsonArray();
        var skipped = new JsonArray();
        var failed = new JsonArray();
        foreach (var c in Cases)
        {
            if (only is not null && !only.Contains(c.Name) && !only.Contains(c.Method.Type)) continue;
            if (!AdapterMethods.IsSupported(c.Method))
            {
                skipped.Add(new JsonObject { ["name"] = c.Name, ["type"] = c.Method.Type, ["reason"] = "registered but not trainable by this worker" });
                continue;
            }
            MethodSpec fitted;
            try { fitted = Fit(c.Method, config.LayerLinears()); }
            catch (ArgumentException e)
            {
                skipped.Add(new JsonObject { ["name"] = c.Name, ["type"] = c.Method.Type, ["reason"] = e.Message });
                continue;
            }
            try { cases.Add(RunCase(c with { Method = fitted }, modelDir, ids, outDir, device, seed)); }
            catch (Exception e) when (IsDataError(e) || e is InvalidOperationException or NotSupportedException)
            {
                failed.Add(new JsonObject { ["name"] = c.Name, ["type"] = c.Method.Type, ["error"] = $"{e.GetType().Name}: {e.Message}" });
            }
        }
        manifest["cases"] = cases;
        manifest["skipped"] = skipped;
        manifest["failed"] = failed;
        AdapterFiles.WriteJson(Path.Combine(outDir, "manifest.json"), manifest);
        return manifest;
    }

    /// <summary>Each case on a freshly loaded base: PiSSA/OLoRA replace W by a residual and XGBLoRA merges boosters into
    /// W, so a model that carried an earlier case would be the wrong base for the next.</summary>
    private static Llama LoadModel(string dir, Device device)
    {
        var model = Llama.Load(dir, device, ScalarType.Float32);
        model.Eval();
        return model;
    }

    private static JsonObject RunCase(ParityCase c, string modelDir, Tensor ids, string outDir, Device device, long seed)
    {
        var spec = c.Method;
        var adapterDir = Path.Combine(outDir, "adapters", c.Name);
        if (Directory.Exists(adapterDir)) Directory.Delete(adapterDir, recursive: true);
        var entry = new JsonObject
        {
            ["name"] = c.Name,
            ["type"] = spec.Type,
            ["options"] = JsonSerializer.SerializeToNode(spec, DomainJson.Options),
            ["adapter_dir"] = Path.Combine("adapters", c.Name),
        };
        using (var model = LoadModel(modelDir, device))
        using (var method = AdapterMethods.Attach(spec, model, seed))
        {
            Perturb(method, c.Steps, seed + 1);
            method.Train(false);
            entry["logits"] = WriteLogits(model, ids, Path.Combine(outDir, $"{c.Name}.logits.safetensors"));
            var files = method.Save(adapterDir, Path.GetFullPath(modelDir)).ToList();
            files.AddRange(MergedModel.Write(adapterDir, model, method, modelDir, out var mergedInfo));
            entry["files"] = new JsonArray(files.Select(f => (JsonNode)f).ToArray());
            entry["trainable_parameters"] = method.TrainableParameterCount;
            entry["export"] = method.ExportInfo?.DeepClone();
            entry["merged"] = mergedInfo.DeepClone();
            // The records a job's metadata.json keeps about these folders (check_peft.py checks the recorded SVD errors).
            AdapterFiles.WriteJson(Path.Combine(adapterDir, Trainer.MetadataFile), new JsonObject
            {
                ["method"] = JsonSerializer.SerializeToNode(spec, DomainJson.Options),
                ["trainable_parameters"] = method.TrainableParameterCount,
                ["lora_export"] = method.ExportInfo?.DeepClone(),
                ["merged"] = mergedInfo.DeepClone(),
            });
        }
        entry["peft_type"] = JsonNode.Parse(File.ReadAllText(Path.Combine(adapterDir, AdapterFiles.Config)))!["peft_type"]!.DeepClone();
        var loraDir = Path.Combine(adapterDir, LoraExport.Dir);
        entry["lora_logits"] = File.Exists(Path.Combine(loraDir, AdapterFiles.Config))
            ? WithLoraExport(modelDir, device, ids, loraDir, Path.Combine(outDir, $"{c.Name}.lora.logits.safetensors"), seed)
            : null;
        using (var merged = LoadModel(Path.Combine(adapterDir, MergedModel.Dir), device))
            entry["merged_logits"] = WriteLogits(merged, ids, Path.Combine(outDir, $"{c.Name}.merged.logits.safetensors"));
        return entry;
    }

    /// <summary>
    /// Moves every adapter tensor off its init as training would: t += N(0, 0.05²), seeded, so that zero-initialised
    /// parts (LoRA's B, Bone's block) are non-zero and the comparison tests the adapter's math, not its init. With
    /// <paramref name="steps"/> &gt; 0 it replays that many optimizer steps' after-step hook, perturbing before each
    /// (XGBLoRA: every step ends a round, merging the perturbed booster and drawing the next).
    /// </summary>
    private static void Perturb(IAdapterMethod method, int steps, long seed)
    {
        AddNoise(method, seed);
        if (steps == 0) return;
        using var optimizer = new AdamW(method.ParamGroups(new Hyperparameters()));
        for (var step = 0; step < steps; step++)
        {
            method.AfterOptimizerStep(step, optimizer);
            AddNoise(method, seed + 1 + step);
        }
    }

    private static void AddNoise(IAdapterMethod method, long seed)
    {
        using var gen = new Generator(seed);
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var (_, t) in method.TrainableTensors)
        {
            using var scope = DisposeScope.Begin();
            t.Add_((Tensor.Randn(t.Shape, gen) * Noise).To(t.Device, t.DType));
        }
    }

    /// <summary>Our logits with a lora/ export loaded as a plain LoRA (r and lora_alpha from its adapter_config.json) on
    /// a fresh copy of the original base.</summary>
    private static string WithLoraExport(string modelDir, Device device, Tensor ids, string loraDir, string path, long seed)
    {
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(loraDir, AdapterFiles.Config)))!;
        var spec = new LoraMethod
        {
            R = config["r"]!.GetValue<int>(),
            Alpha = config["lora_alpha"]!.GetValue<double>(),
            TargetModules = config["target_modules"]!.AsArray().Select(t => t!.GetValue<string>()).ToArray(),
        };
        using var model = LoadModel(modelDir, device);
        // Not AdapterMethods.Attach: an export's rank may exceed a module's smaller side (Bone's r=48 on a 32-wide
        // k_proj), which a LoRA job would refuse and PEFT loads as it is.
        using var lora = new Training.Methods.Lora.LoraAdapter(spec);
        lora.Attach(model, seed);
        lora.Load(loraDir);
        lora.Train(false);
        return WriteLogits(model, ids, path);
    }

    /// <summary>
    /// The case's options on every linear module, with integer options halved while the model's shapes reject them
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
