using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Models;
using FineTune.Domain.Tokenizers;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tools;

/// <summary>
/// <c>FineTune.Worker bench compare [options]</c>: fine-tunes one model on one dataset with every adapter method at a
/// matched trainable-parameter budget (the Bone paper's protocol: LoRA r = 32 against bone r = 64, equal counts on
/// square modules) through the worker's own <see cref="Trainer"/> — same data order, seed, schedule and steps for all —
/// and writes a markdown table and an SVG plot of the training and validation loss curves.
/// </summary>
public static class CompareCommand
{
    public const string Usage = """
        usage: FineTune.Worker bench compare [options]
          --device cpu|cuda[:N]      (default: cuda when available, else cpu)
          --preset tiny|small|1b     random-init model of the bench's shapes (default: tiny on cpu, 1b on cuda), with
                                     the byte tokenizer
          --model DIR                an HF model folder instead (its own tokenizer)
          --methods A,B,...          default: all of lora,pissa,olora,lora+,dora,bone,bat,sbora-fa,vblora,xgblora
          --bone-r N                 the budget: bone's trainable parameters at this r (default 64, at most hidden/8)
          --steps N --batch N        optimizer steps and examples per step (default 400 x 8 on cpu, 600 x 32 on cuda)
          --lr X                     peak AdamW learning rate for every method, cosine schedule, 5% warm-up
                                     (default 1e-3); VB-LoRA keeps its own absolute rates
          --seq N                    maxSeqLength (default 64)
          --scale N                  dataset size multiplier (default 1 on cpu, 8 on cuda: 736 / 5888 training examples)
          --log-every N --eval-every N   training-loss window and validation interval in steps (default 5 and 20)
          --seed N                   seed of model, data order and adapter init (default 1234)
          --md FILE --svg FILE --json FILE   outputs (the table, the plot, everything as JSON)
          --work DIR                 scratch folder for the model and adapters (default: a temporary one, removed)
          --deadline SECONDS         start no new method after this many seconds
          --note TEXT                a sentence for the report's setup paragraph (e.g. how the learning rate was chosen)
          --from-json FILE[,FILE]    write --md/--svg from the --json of earlier runs (merged: same setup, other
                                     --methods), without training
        """;

    public static async Task<int> RunAsync(string[] args)
    {
        CompareOptions o;
        try { o = CompareOptions.Parse(args); }
        catch (BenchUsageException e)
        {
            Console.Error.WriteLine(e.Message);
            Console.Error.WriteLine(Usage);
            return 2;
        }
        var work = o.WorkDir ?? Path.Combine(Path.GetTempPath(), $"finetune-compare-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            // --from-json redraws the table and the plot of earlier runs (e.g. made on a GPU host) without training.
            var report = o.FromJson is { } from
                ? Merge(from)
                : await RunComparisonAsync(o, work, "FineTune.Worker bench compare " + CommandLine(args));
            var md = CompareMarkdown.Write(report, o.SvgPath is { } svg && o.MarkdownPath is { } mdPath
                ? Path.GetRelativePath(Path.GetDirectoryName(Path.GetFullPath(mdPath))!, Path.GetFullPath(svg)).Replace('\\', '/') : null);
            if (o.MarkdownPath is { } mp) WriteFile(mp, md);
            if (o.SvgPath is { } sp) WriteFile(sp, LossPlot.Svg(report));
            if (o.JsonPath is { } jp) WriteFile(jp, JsonSerializer.Serialize(report, new JsonSerializerOptions { WriteIndented = true }));
            Console.WriteLine(md);
            return report.Rows.Any(r => r.Status == "ok") ? 0 : 1;
        }
        catch (Exception e) when (e is TorchException or IOException or InvalidDataException or SafetensorsException or JsonException
                                      or UnauthorizedAccessException or TokenizerException or DatasetEncodingException)
        {
            Console.Error.WriteLine($"compare failed: {e.GetType().Name}: {e.Message}");
            return 1;
        }
        finally
        {
            if (o.WorkDir is null && Directory.Exists(work)) Directory.Delete(work, recursive: true);
        }
    }

    public static async Task<CompareReport> RunComparisonAsync(CompareOptions o, string work, string command)
    {
        var clock = Stopwatch.StartNew();
        Trainer.UseDevice(o.Device);
        var (modelDir, modelName) = PrepareModel(o, work);
        var config = ModelConfig.Load(modelDir);
        var tokenizer = TokenizerLoader.Load(modelDir);
        var data = CompareData.Build(o.Seed, o.Scale);
        var boneR = o.BoneR ?? CompareMethods.DefaultBoneR(config);
        var budget = CompareMethods.Budget(config, boneR);
        var context = new CompareContext(boneR, o.Steps);
        var hyper = new Hyperparameters
        {
            MaxSteps = o.Steps, BatchSize = o.Batch, LearningRate = o.LearningRate, Scheduler = "cosine",
            WarmupSteps = Math.Max(1, o.Steps / 20), MaxSeqLength = o.Seq, Seed = o.Seed, MaxGradNorm = 1.0, EvalEvery = o.EvalEvery,
        };

        Console.Error.WriteLine($"model {modelName}: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}; budget {budget:N0} trainable parameters (bone r={boneR} on all 7 linears)");
        var rows = new List<CompareRow>();
        foreach (var variant in CompareMethods.Variants.Where(v => o.Methods is null || o.Methods.Contains(v.Label)))
        {
            var plan = CompareMethods.Plan(variant, config, budget, context);
            Console.Error.WriteLine(plan.Spec is { } s
                ? $"  {variant.Label,-9} {CompareMethods.Describe(s),-55} {plan.Trainable,12:N0} ({Relative(plan.Trainable, budget)})"
                : $"  {variant.Label,-9} skipped: {plan.SkipReason}");
            if (plan.Spec is null) { rows.Add(CompareRow.Skipped(variant, plan.SkipReason!)); continue; }
            if (o.PastDeadline) { rows.Add(CompareRow.Skipped(variant, "the time budget was spent", plan)); continue; }
            rows.Add(await TrainOneAsync(plan, o, hyper, modelDir, modelName, tokenizer, data, work));
            var last = rows[^1];
            Console.Error.WriteLine(last.Status == "ok"
                ? $"            train {last.FinalTrainLoss:F4}  validation {last.FinalValidationLoss:F4} (best {last.BestValidationLoss:F4})  {last.TokensPerSecond:N0} tokens/s  {last.WallSeconds:F1} s"
                : $"            {last.Status}: {last.Note}");
        }
        foreach (var type in CompareMethods.Uncovered())
            rows.Add(new CompareRow(type, type, "", 0, null, "skipped", "registered, but the comparison has no budget rule for it yet", "", [], []));

        return new CompareReport(
            DateUtc: DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm", CultureInfo.InvariantCulture),
            Machine: $"{Environment.MachineName}, {Environment.ProcessorCount} cores, {RuntimeInformation.OSDescription}",
            Device: o.Device.ToString(), Command: command, Model: modelName,
            ModelShape: $"{config.NumHiddenLayers} layers, hidden {config.HiddenSize}, intermediate {config.IntermediateSize}, " +
                        $"{config.NumAttentionHeads} heads ({config.KvHeads} kv), vocabulary {config.VocabSize}",
            Data: data.Description, BoneR: boneR, Budget: budget, Steps: o.Steps, Batch: o.Batch, LearningRate: o.LearningRate,
            WarmupSteps: hyper.WarmupSteps, Seq: o.Seq, Seed: o.Seed, LogEvery: o.LogEvery, EvalEvery: o.EvalEvery,
            TotalSeconds: Math.Round(clock.Elapsed.TotalSeconds, 1), Note: o.Note, Rows: rows);
    }

    private static async Task<CompareRow> TrainOneAsync(ComparePlan plan, CompareOptions o, Hyperparameters hyper, string modelDir,
        string modelName, ITokenizer tokenizer, CompareData.Set data, string work)
    {
        var v = plan.Variant;
        var dir = Path.Combine(work, "runs", v.Label.Replace('+', 'p'));
        var recorder = new Recorder();
        var spec = new TrainingSpec(modelDir, tokenizer, data.Train, data.Validation, plan.Spec!, hyper, o.Device,
            o.Device.Kind == DeviceKind.Cpu ? ScalarType.Float32 : ScalarType.BFloat16,
            CheckpointDir: Path.Combine(dir, "checkpoints"), ResumeFrom: null, OutputDir: Path.Combine(dir, "adapter"),
            LogEvery: o.LogEvery, CheckpointEvery: int.MaxValue, BaseModelName: modelName);
        var wall = Stopwatch.StartNew();
        try
        {
            var result = await new Trainer().RunAsync(spec, recorder, CancellationToken.None);
            wall.Stop();
            // What the attached method really trained (metadata.json), beside the planned count from the formulas.
            long? actual = null;
            var metadataPath = Path.Combine(spec.OutputDir, Trainer.MetadataFile);
            if (File.Exists(metadataPath))
                actual = JsonDocument.Parse(File.ReadAllText(metadataPath)).RootElement.GetProperty("trainable_parameters").GetInt64();
            var train = recorder.Rows.Select(r => new CurvePoint(r.Step, r.Loss)).ToList();
            var validation = recorder.Rows.Where(r => r.ValidationLoss is not null).Select(r => new CurvePoint(r.Step, r.ValidationLoss!.Value)).ToList();
            // Windows without a validation pass measure training alone.
            var clean = recorder.Rows.Where(r => r.ValidationLoss is null && r.TokensPerSecond > 0).Select(r => r.TokensPerSecond).ToList();
            var tps = Median(clean.Count > 0 ? clean : recorder.Rows.Select(r => r.TokensPerSecond).ToList());
            var best = validation.Count > 0 ? validation.MinBy(p => p.Loss) : null;
            var note = actual is { } a && a != plan.Trainable ? $"the attached method trains {a:N0} parameters" : "";
            if (!double.IsFinite(result.FinalLoss)) note = (note + " diverged (loss not finite)").Trim();
            return new CompareRow(v.Label, v.Type, CompareMethods.Describe(plan.Spec!), plan.Trainable, actual, "ok", note, v.Notes, train, validation)
            {
                FinalTrainLoss = result.FinalLoss, FinalValidationLoss = result.FinalValidationLoss,
                BestValidationLoss = best?.Loss, BestValidationStep = best?.Step, TokensPerSecond = tps,
                WallSeconds = Math.Round(wall.Elapsed.TotalSeconds, 1),
            };
        }
        catch (Exception e) when (e is TorchException or ArgumentException or NotSupportedException or InvalidOperationException)
        {
            return new CompareRow(v.Label, v.Type, CompareMethods.Describe(plan.Spec!), plan.Trainable, null, "failed",
                e.Message.Length > 300 ? e.Message[..300] + "…" : e.Message, v.Notes, [], []);
        }
        finally
        {
            if (o.Device.Kind == DeviceKind.Cuda) Cuda.EmptyCache();
            // The adapters are not the point here; keep the scratch folder small.
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The model folder: <c>--model</c> as given, or the preset's decoder shapes written once with random
    /// weights and the byte-level tokenizer (its 259-token vocabulary: the preset's larger one would only add tokens
    /// the data never uses). See <see cref="WriteRandomModel"/> for the init.</summary>
    private static (string Dir, string Name) PrepareModel(CompareOptions o, string work)
    {
        if (o.ModelDir is { } given) return (given, Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(given))));
        var dir = Path.Combine(work, "model-" + o.Preset);
        var config = BenchModels.Preset(o.Preset) with
        {
            VocabSize = TinyTokenizer.VocabSize,
            BosTokenId = TinyTokenizer.BosId,
            EosTokenId = JsonDocument.Parse(TinyTokenizer.EosId.ToString(CultureInfo.InvariantCulture)).RootElement.Clone(),
            PadTokenId = TinyTokenizer.PadId,
            MaxPositionEmbeddings = Math.Max(512, o.Seq),
            TorchDtype = o.Device.Kind == DeviceKind.Cpu ? "float32" : "bfloat16",
        };
        WriteRandomModel(dir, config, o.Seed, o.Device.Kind == DeviceKind.Cpu ? ScalarType.Float32 : ScalarType.BFloat16);
        TinyTokenizer.WriteFiles(dir);
        return (dir, $"preset {o.Preset} (random weights, byte tokenizer)");
    }

    /// <summary>
    /// Linears N(0, 0.02²) as HF initialises them, but the (tied) embeddings N(0, 1/hidden): the head is frozen and
    /// the final norm makes ‖h‖ = √hidden, so the largest logit a token can get is ‖e‖·√hidden. With HF's 0.02 that is
    /// 0.02·hidden (2.6 at hidden 128): no adapter could make a confident prediction and every method would stall at
    /// the same floor of several nats. Rows of norm ≈ 1 allow logits of ≈ √hidden while starting near uniform.
    /// </summary>
    public static void WriteRandomModel(string dir, ModelConfig c, long seed, ScalarType dtype)
    {
        Directory.CreateDirectory(dir);
        using var gen = new Generator(seed);
        using var scope = DisposeScope.Begin();
        var w = new Dictionary<string, Tensor>();
        Tensor Normal(double std, params long[] shape)
        {
            using var inner = DisposeScope.Begin();   // the fp32 draws of a 1b preset are GBs: free them per tensor
            return (Tensor.Randn(shape, gen) * std).To(dtype).MoveToOuterScope();
        }
        w["model.embed_tokens.weight"] = Normal(1 / Math.Sqrt(c.HiddenSize), c.VocabSize, c.HiddenSize);
        for (var l = 0; l < c.NumHiddenLayers; l++)
        {
            foreach (var m in c.LayerLinears()) w[$"{ModelConfig.ModulePath(l, m.Name)}.weight"] = Normal(0.02, m.Out, m.In);
            w[$"model.layers.{l}.input_layernorm.weight"] = Tensor.Ones([c.HiddenSize], dtype);
            w[$"model.layers.{l}.post_attention_layernorm.weight"] = Tensor.Ones([c.HiddenSize], dtype);
        }
        w["model.norm.weight"] = Tensor.Ones([c.HiddenSize], dtype);
        if (!c.TieWordEmbeddings) w["lm_head.weight"] = Normal(1 / Math.Sqrt(c.HiddenSize), c.VocabSize, c.HiddenSize);
        TinyModel.WriteWeights(dir, w);
        File.WriteAllText(Path.Combine(dir, "config.json"), JsonSerializer.Serialize(c, new JsonSerializerOptions
        {
            WriteIndented = true, DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull,
        }));
    }

    /// <summary>Reports of runs with the same setup and different <c>--methods</c> (e.g. one per time-limited command),
    /// as one: the first one's header, every run's trained rows (a method trained in an earlier file wins).</summary>
    public static CompareReport Merge(IReadOnlyList<string> files)
    {
        var reports = files.Select(f => JsonSerializer.Deserialize<CompareReport>(File.ReadAllText(f))
            ?? throw new InvalidDataException($"{f}: not a comparison report")).ToList();
        var first = reports[0];
        foreach (var (r, f) in reports.Zip(files).Skip(1))
            if ((r.Model, r.Budget, r.Steps, r.Batch, r.LearningRate, r.Seed, r.Data) != (first.Model, first.Budget, first.Steps, first.Batch, first.LearningRate, first.Seed, first.Data))
                throw new InvalidDataException($"{f}: another setup than {files[0]} (model, budget, steps, batch, learning rate, seed and data must match)");
        var rows = new List<CompareRow>();
        foreach (var row in reports.SelectMany(r => r.Rows))
        {
            var i = rows.FindIndex(x => x.Label == row.Label);
            if (i < 0) rows.Add(row);
            else if (rows[i].Status != "ok" && row.Status == "ok") rows[i] = row;
        }
        return first with
        {
            Rows = rows, Command = string.Join("; ", reports.Select(r => r.Command).Distinct()),
            TotalSeconds = reports.Sum(r => r.TotalSeconds),
        };
    }

    /// <summary>The arguments as the report shows them: --note's text is in the report already.</summary>
    private static string CommandLine(string[] args) =>
        string.Join(' ', args.Select((a, i) => i > 0 && args[i - 1] == "--note" ? "…" : a.Contains(' ') ? $"'{a}'" : a));

    public static string Relative(long count, long budget) =>
        budget == 0 ? "-" : ((count - budget) * 100.0 / budget).ToString("+0.0;-0.0;0.0", CultureInfo.InvariantCulture) + "%";

    private static double Median(List<double> xs)
    {
        if (xs.Count == 0) return double.NaN;
        var s = xs.Order().ToArray();
        return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    private static void WriteFile(string path, string text)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null) Directory.CreateDirectory(dir);
        File.WriteAllText(path, text);
    }

    private sealed class Recorder : ITrainingReporter
    {
        public List<TrainingMetrics> Rows { get; } = [];
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnMetricsAsync(TrainingMetrics metrics, CancellationToken ct)
        {
            Rows.Add(metrics);
            return ValueTask.CompletedTask;
        }
        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct) => ValueTask.CompletedTask;
    }
}

public sealed record CurvePoint(long Step, double Loss);

/// <summary>One method's run: the fitted options, the planned and the attached trainable counts, the curves.</summary>
public sealed record CompareRow(string Label, string Type, string Options, long Trainable, long? TrainableAttached, string Status,
    string Note, string Settings, IReadOnlyList<CurvePoint> Train, IReadOnlyList<CurvePoint> Validation)
{
    public double? FinalTrainLoss { get; init; }
    public double? FinalValidationLoss { get; init; }
    public double? BestValidationLoss { get; init; }
    public long? BestValidationStep { get; init; }
    public double? TokensPerSecond { get; init; }
    public double? WallSeconds { get; init; }

    public static CompareRow Skipped(CompareVariant v, string why, ComparePlan? plan = null) =>
        new(v.Label, v.Type, plan?.Spec is { } s ? CompareMethods.Describe(s) : "", plan?.Trainable ?? 0, null, "skipped", why, v.Notes, [], []);
}

public sealed record CompareReport(string DateUtc, string Machine, string Device, string Command, string Model, string ModelShape,
    string Data, int BoneR, long Budget, int Steps, int Batch, double LearningRate, int WarmupSteps, int Seq, long Seed,
    int LogEvery, int EvalEvery, double TotalSeconds, string? Note, IReadOnlyList<CompareRow> Rows)
{
    [System.Text.Json.Serialization.JsonIgnore] public IEnumerable<CompareRow> Trained => Rows.Where(r => r.Status == "ok" && r.Train.Count > 0);
}

public sealed class CompareOptions
{
    public Device Device { get; private set; } = Device.Cpu;
    public string Preset { get; private set; } = "small";
    public string? ModelDir { get; private set; }
    public HashSet<string>? Methods { get; private set; }
    public int? BoneR { get; private set; }
    public int Steps { get; private set; }
    public int Batch { get; private set; }
    public double LearningRate { get; private set; }
    public int Seq { get; private set; } = 64;
    public int Scale { get; private set; }
    public int LogEvery { get; private set; } = 5;
    public int EvalEvery { get; private set; } = 20;
    public long Seed { get; private set; } = 1234;
    public string? MarkdownPath { get; private set; }
    public string? SvgPath { get; private set; }
    public string? JsonPath { get; private set; }
    public string? WorkDir { get; private set; }
    public string? Note { get; private set; }
    public IReadOnlyList<string>? FromJson { get; private set; }
    private DateTime? _deadline;

    public bool PastDeadline => _deadline is { } d && DateTime.UtcNow > d;

    public static CompareOptions Parse(string[] args)
    {
        var o = new CompareOptions();
        string? device = null, preset = null;
        int? steps = null, batch = null, scale = null;
        double? lr = null;
        for (var i = 0; i < args.Length; i++)
        {
            var key = args[i];
            if (i + 1 >= args.Length) throw new BenchUsageException($"{key} needs a value");
            var v = args[++i];
            switch (key)
            {
                case "--device": device = v; break;
                case "--preset": preset = v; break;
                case "--model": o.ModelDir = v; break;
                case "--methods":
                    o.Methods = v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToHashSet();
                    var unknown = o.Methods.Except(CompareMethods.Variants.Select(x => x.Label)).ToList();
                    if (unknown.Count > 0)
                        throw new BenchUsageException($"--methods: unknown {string.Join(", ", unknown)} (known: {string.Join(", ", CompareMethods.Variants.Select(x => x.Label))})");
                    break;
                case "--bone-r": o.BoneR = (int)Num(key, v, 1, 4096); break;
                case "--steps": steps = (int)Num(key, v, 1, 1_000_000); break;
                case "--batch": batch = (int)Num(key, v, 1, 1024); break;
                case "--lr": lr = Num(key, v, 1e-9, 1); break;
                case "--seq": o.Seq = (int)Num(key, v, 16, 4096); break;
                case "--scale": scale = (int)Num(key, v, 1, 64); break;
                case "--log-every": o.LogEvery = (int)Num(key, v, 1, 1_000_000); break;
                case "--eval-every": o.EvalEvery = (int)Num(key, v, 1, 1_000_000); break;
                case "--seed": o.Seed = (long)Num(key, v, 0, int.MaxValue); break;
                case "--md": o.MarkdownPath = v; break;
                case "--svg": o.SvgPath = v; break;
                case "--json": o.JsonPath = v; break;
                case "--work": o.WorkDir = v; break;
                case "--from-json": o.FromJson = v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries); break;
                case "--note": o.Note = v.Length <= 2000 ? v : throw new BenchUsageException("--note: at most 2000 characters"); break;
                case "--deadline": o._deadline = DateTime.UtcNow.AddSeconds(Num(key, v, 0, 1e7)); break;
                default: throw new BenchUsageException($"unknown option {key}");
            }
        }
        try { o.Device = device is null ? (Cuda.IsAvailable() ? Device.Cuda() : Device.Cpu) : Device.Parse(device); }
        catch (FormatException e) { throw new BenchUsageException($"--device: {e.Message}"); }
        var cuda = o.Device.Kind == DeviceKind.Cuda;
        if (cuda && (!Cuda.IsAvailable() || o.Device.Index >= Cuda.DeviceCount()))
            throw new BenchUsageException($"--device {o.Device}: libtorch sees {(Cuda.IsAvailable() ? Cuda.DeviceCount() : 0)} CUDA device(s)");
        if (o.ModelDir is not null && preset is not null) throw new BenchUsageException("--model and --preset exclude each other");
        o.Preset = preset ?? (cuda ? "1b" : "tiny");
        BenchModels.Preset(o.Preset);   // validates the name
        o.Steps = steps ?? (cuda ? 600 : 400);
        o.LearningRate = lr ?? 1e-3;
        o.Batch = batch ?? (cuda ? 32 : 8);
        o.Scale = scale ?? (cuda ? 8 : 1);
        return o;
    }

    private static double Num(string key, string v, double min, double max) =>
        double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d >= min && d <= max
            ? d : throw new BenchUsageException($"{key}: '{v}' is not a number in [{min}, {max}]");
}
