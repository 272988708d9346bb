using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Domain.Models;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tools;

/// <summary>
/// <c>FineTune.Worker bench micro|train|all [options]</c>: benchmarks of the binding and of the training step
/// (<c>bench compare</c>, the method comparison at a matched parameter budget, is <see cref="CompareCommand"/>).
/// <list type="bullet">
/// <item><c>micro</c>: bf16 matmul TFLOP/s on CUDA (warmed, synchronized, rotating inputs), fp32 matmul GFLOP/s on the
/// CPU, per-op call overhead of small ops (µs per op, the tensor's creation and disposal included).</item>
/// <item><c>train</c>: the worker's own training step (<see cref="Trainer.Step"/>) on a Llama-architecture model
/// (random init in memory from a preset, or an HF folder), one row per configuration: tokens/s, peak GPU memory,
/// MFU (4·N_base + 6·N_trainable FLOPs per token over the bf16 matmul peak) and the losses of every step, for the
/// loss-curve comparison with <c>tests/bench/peft_bench.py</c>, which trains the same model on the same tokens.</item>
/// </list>
/// Output: a markdown table on stdout, JSON with <c>--json FILE</c>. Configurations are method names (any registered
/// method, with the benchmark's preset options), <c>name=JSON</c> for explicit options, and the suffixes <c>+gc</c>
/// (gradient checkpointing) and <c>+bf16</c> (bf16 adapters), e.g. <c>--configs lora,lora+gc,bone,bat=…</c>.
/// </summary>
public static class BenchCommand
{
    public const string Usage = """
        usage: FineTune.Worker bench micro|train|all [options]
               FineTune.Worker bench compare [options]   every method at a matched parameter budget (CompareCommand.cs)
          --device cpu|cuda[:N]      (default: cuda when available, else cpu)
          --json FILE                write the results as JSON
          --md FILE                  write the markdown table
          --deadline SECONDS         stop starting new work after this many seconds (default: none)
        micro:
          --size N                   bf16 matmul size on CUDA (default 8192); --cpu-size N fp32 matmul size on the CPU (default 1024)
          --quick                    fewer CPU iterations (smoke tests)
        train:
          --preset tiny|small|1b     random-init model built in memory (default: 1b on cuda, small on cpu)
          --model DIR                an HF model folder instead (config.json + safetensors)
          --configs A,B,...          default lora,lora+gc,lora+bf16,dora,bone,bat,vblora (cuda) or lora,bone (cpu)
          --batch N --seq N          default 4 x 2048 (cuda), 2 x 128 (cpu)
          --warmup N --steps N       untimed then timed steps (default 3 and 10)
          --lr X --seed N            AdamW learning rate (constant, default 1e-3), seed of init and data (default 1234)
          --dtype bf16|fp32          base weights on cuda (default bf16; the CPU computes in fp32)
          --tokens FILE              token ids (int32 little-endian) instead of the built-in generator
          --peak-tflops X            the matmul peak for MFU (default: measured here)
          --init-dir DIR             write each configuration's initial adapter tensors (PEFT names) and learning rates
          --profile A,B --profile-dir DIR   one extra step of these configurations under libtorch's kernel profiler
                                     (Chrome traces; needs libfinetune_torch_profiler.so in FINETUNE_TORCH_PROFILER)
        """;

    public static Task<int> RunAsync(string[] args)
    {
        if (args is ["compare", .. var rest]) return CompareCommand.RunAsync(rest);
        JsonObject? result = null;
        BenchOptions? options = null;
        try
        {
            var o = options = BenchOptions.Parse(args);
            result = new JsonObject
            {
                ["kind"] = "finetune-bench",
                ["impl"] = "ours",
                ["date_utc"] = DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm", CultureInfo.InvariantCulture),
                ["machine"] = $"{Environment.MachineName}, {Environment.ProcessorCount} cores, {RuntimeInformation.OSDescription}",
                ["libtorch"] = Torch.Torch.Version,
                ["fused_kernels"] = Cuda.FusedKernelsAvailable,   // rotary/SwiGLU as our CUDA kernels, else composite ops
                ["device"] = o.Device.ToString(),
                ["command"] = "FineTune.Worker bench " + string.Join(' ', args),
            };
            var md = new StringBuilder();
            if (o.Mode is "micro" or "all")
            {
                var micro = Micro(o);
                result["micro"] = micro;
                md.Append(MicroMarkdown(micro));
            }
            if (o.Mode is "train" or "all")
            {
                var train = Train(o, result["micro"]?["matmul_bf16_tflops"]?.GetValue<double>());
                result["train"] = train;
                md.Append(TrainMarkdown(train));
            }
            var json = result.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
            if (o.JsonPath is { } jp) WriteFile(jp, json);
            if (o.MarkdownPath is { } mp) WriteFile(mp, md.ToString());
            Console.WriteLine(md.ToString());
            return Task.FromResult(0);
        }
        catch (BenchUsageException e)
        {
            Console.Error.WriteLine(e.Message);
            Console.Error.WriteLine(Usage);
            return Task.FromResult(2);
        }
        catch (Exception e) when (e is TorchException or IOException or InvalidDataException or SafetensorsException or UnauthorizedAccessException)
        {
            // What was measured before the failure is still written.
            Console.Error.WriteLine($"bench failed: {e.GetType().Name}: {e.Message}");
            if (result is not null && options?.JsonPath is { } jp)
            {
                result["error"] = $"{e.GetType().Name}: {e.Message}";
                WriteFile(jp, result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            }
            return Task.FromResult(1);
        }
    }

    private static void WriteFile(string path, string text)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null) Directory.CreateDirectory(dir);
        File.WriteAllText(path, text);
    }

    // ------------------------------------------------------------------ micro-benchmarks

    /// <summary>Binding micro-benchmarks; numbers only (no assertions).</summary>
    public static JsonObject Micro(BenchOptions o)
    {
        var r = new JsonObject();
        // Each measurement on its own: one that fails (e.g. out of memory) is recorded and the others still run.
        void Measure(string key, Func<JsonNode?> f)
        {
            try { r[key] = f(); }
            catch (TorchException e) { r[key + "_error"] = e.Message.Length > 300 ? e.Message[..300] : e.Message; }
        }
        var quick = o.QuickMicro;
        Measure("op_overhead_cpu_us", () => OpOverhead(Device.Cpu, quick ? 2_000 : 20_000));
        Measure("matmul_fp32_cpu_gflops", () => Round(MatmulRate(Device.Cpu, o.CpuMatmulSize, ScalarType.Float32, quick ? 2 : 5) / 1e9, 2));
        r["matmul_fp32_cpu_n"] = o.CpuMatmulSize;
        if (o.Device.Kind == DeviceKind.Cuda)
        {
            Trainer.UseDevice(o.Device);
            Measure("matmul_bf16_tflops", () => Round(MatmulRate(o.Device, o.MatmulSize, ScalarType.BFloat16, 20) / 1e12, 1));
            r["matmul_bf16_n"] = o.MatmulSize;
            Measure("matmul_fp32_cuda_tflops", () => Round(MatmulRate(o.Device, quick ? o.MatmulSize : 4096, ScalarType.Float32, 10) / 1e12, 1));
            Measure("op_overhead_cuda_us", () => OpOverhead(o.Device, quick ? 2_000 : 20_000));
        }
        return r;
    }

    /// <summary>Microseconds per small op (a 4-element tensor), creation and disposal of the result included:
    /// the binding's fixed cost on top of libtorch's dispatch. Median of 5 rounds.</summary>
    private static JsonObject OpOverhead(Device device, int ops)
    {
        using var scope = DisposeScope.Begin();
        var a = Tensor.Ones([4], ScalarType.Float32, device);
        var b = Tensor.Ones([4], ScalarType.Float32, device);
        var m = Tensor.Ones([4, 4], ScalarType.Float32, device);
        var cases = new (string Name, Func<Tensor> Op)[]
        {
            // alias: a second handle on the same tensor, no libtorch op at all: the binding's own fixed cost
            // (P/Invoke, the C# object, its scope registration and disposal).
            ("alias", () => Tensor.Wrap(Native.ft_alias(a.Handle))),
            ("add", () => a + b), ("mul_scalar", () => a * 2.0), ("view", () => m.View(16)),
            ("matmul_4x4", () => m.MatMul(m)), ("sum", () => a.Sum()),
        };
        var r = new JsonObject();
        foreach (var (name, op) in cases)
        {
            var rounds = new List<double>();
            for (var round = 0; round < 6; round++)
            {
                var sw = Stopwatch.StartNew();
                for (var i = 0; i < ops; i += 1000)
                    using (DisposeScope.Begin())
                        for (var j = 0; j < 1000; j++) op();
                if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index);
                if (round > 0) rounds.Add(sw.Elapsed.TotalMicroseconds / ops);   // round 0 warms up
            }
            r[name] = Round(Median(rounds), 3);
        }
        return r;
    }

    /// <summary>FLOP/s of an n×n×n matmul: 3 input pairs in rotation (so repeated runs do not measure a cache),
    /// random data (zeros run faster), warmed, synchronized, median of 3 rounds.</summary>
    public static double MatmulRate(Device device, int n, ScalarType dtype, int iters)
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(7, device);
        var pairs = Enumerable.Range(0, 3)
            .Select(_ => (Tensor.Randn([n, n], gen, ScalarType.Float32, device).To(dtype), Tensor.Randn([n, n], gen, ScalarType.Float32, device).To(dtype)))
            .ToArray();
        void Sync() { if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index); }
        for (var i = 0; i < 3; i++) using (DisposeScope.Begin()) pairs[i % 3].Item1.MatMul(pairs[i % 3].Item2);
        Sync();
        var rates = new List<double>();
        for (var round = 0; round < 3; round++)
        {
            var sw = Stopwatch.StartNew();
            using (DisposeScope.Begin())
                for (var i = 0; i < iters; i++) pairs[i % 3].Item1.MatMul(pairs[i % 3].Item2);
            Sync();
            rates.Add(2.0 * n * n * (double)n * iters / sw.Elapsed.TotalSeconds);
        }
        return Median(rates);
    }

    private static string MicroMarkdown(JsonObject m)
    {
        var sb = new StringBuilder("| micro-benchmark (ours) | value |\n|---|---|\n");
        foreach (var (k, v) in m)
        {
            if (v is JsonObject ops)
                foreach (var (op, us) in ops) sb.Append($"| {k} {op} | {us} |\n");
            else sb.Append($"| {k} | {v} |\n");
        }
        return sb.Append('\n').ToString();
    }

    // ------------------------------------------------------------------ training throughput

    public static JsonObject Train(BenchOptions o, double? measuredPeakTflops)
    {
        var device = o.Device;
        Trainer.UseDevice(device);
        var dtype = device.Kind == DeviceKind.Cpu ? ScalarType.Float32 : o.DType;
        var clock = Stopwatch.StartNew();
        using var model = o.ModelDir is { } dir
            ? Llama.Load(dir, device, dtype)
            : BenchModels.Build(BenchModels.Preset(o.Preset), device, dtype, o.Seed);
        var config = model.Config;
        var loadSeconds = clock.Elapsed.TotalSeconds;

        // MFU's denominator: the bf16 matmul peak measured in this run (or the CPU's fp32 matmul rate).
        double peakFlops;
        string peakKind;
        if (o.PeakTflops is { } given) (peakFlops, peakKind) = (given * 1e12, "given");
        else if (measuredPeakTflops is { } m) (peakFlops, peakKind) = (m * 1e12, "bf16 matmul, this run");
        else if (device.Kind == DeviceKind.Cuda) (peakFlops, peakKind) = (MatmulRate(device, 8192, ScalarType.BFloat16, 10), "bf16 matmul 8192, this run");
        else (peakFlops, peakKind) = (MatmulRate(Device.Cpu, o.CpuMatmulSize, ScalarType.Float32, 3), $"fp32 matmul {o.CpuMatmulSize} on the CPU, this run");

        long baseParams = BenchModels.MatmulParameters(config);
        var totalSteps = o.Warmup + o.Steps;
        var tokens = o.TokensPath is { } tp ? BenchData.Read(tp, (long)totalSteps * o.Batch * o.Seq) : BenchData.Tokens(o.Seed, (long)totalSteps * o.Batch * o.Seq, config.VocabSize);
        var batches = Enumerable.Range(0, totalSteps).Select(s => BenchData.Batch(tokens, s, o.Batch, o.Seq)).ToArray();

        var rows = new JsonArray();
        foreach (var c in o.Configs)
        {
            if (o.PastDeadline)
            {
                rows.Add(Row(c, "skipped", "the time budget was spent"));
                continue;
            }
            try { rows.Add(TrainConfig(model, c, o, batches, baseParams, peakFlops)); }
            catch (Exception e) when (e is TorchException or ArgumentException or NotSupportedException or InvalidOperationException or JsonException)
            {
                rows.Add(Row(c, "failed", Shorten(e.Message)));
            }
            finally
            {
                model.GradientCheckpointing = false;
                if (device.Kind == DeviceKind.Cuda) Cuda.EmptyCache();
            }
        }
        return new JsonObject
        {
            ["model"] = o.ModelDir ?? o.Preset,
            ["config"] = JsonSerializer.SerializeToNode(config),
            ["base_matmul_params"] = baseParams,
            ["dtype"] = dtype.ToString(),
            ["batch"] = o.Batch,
            ["seq"] = o.Seq,
            ["warmup"] = o.Warmup,
            ["steps"] = o.Steps,
            ["lr"] = o.LearningRate,
            ["seed"] = o.Seed,
            ["data_check"] = BenchData.Check(tokens),
            ["peak_tflops"] = Round(peakFlops / 1e12, 3),
            ["peak_kind"] = peakKind,
            ["load_seconds"] = Round(loadSeconds, 1),
            ["results"] = rows,
        };
    }

    private static JsonObject Row(BenchConfig c, string status, string note) => new()
    {
        ["config"] = c.Label, ["status"] = status, ["note"] = note,
    };

    private static JsonObject TrainConfig(Llama model, BenchConfig c, BenchOptions o, HostBatch[] batches, long baseParams, double peakFlops)
    {
        var device = model.Device;
        MethodSpec spec;
        try { spec = c.Resolve(); }
        catch (BenchSkip skip) { return Row(c, "skipped", skip.Message); }
        if (!AdapterMethods.IsSupported(spec)) return Row(c, "skipped", $"method '{spec.Type}' has options but no worker layer in this build");
        var errors = spec.Validate().Concat(spec.ValidateShapes(model.Config.LayerLinears())).ToList();
        if (errors.Count > 0) return Row(c, "skipped", string.Join("; ", errors.Select(e => $"{e.Field}: {e.Error}")));

        var hyper = new Hyperparameters
        {
            BatchSize = o.Batch, LearningRate = o.LearningRate, Seed = o.Seed, Scheduler = "constant", MaxGradNorm = 1.0,
            MaxSeqLength = o.Seq, AdapterDtype = c.AdapterDtype, GradientCheckpointing = c.GradientCheckpointing,
        };
        if (device.Kind == DeviceKind.Cuda)
        {
            Cuda.Synchronize(device.Index);
            Cuda.ResetPeakMemoryStats(device.Index);
        }
        var wall = Stopwatch.StartNew();
        using var method = AdapterMethods.Attach(spec, model, o.Seed);
        Trainer.SetAdapterPrecision(method, c.AdapterDtype);
        model.GradientCheckpointing = c.GradientCheckpointing;
        using var optimizer = new AdamW(method.ParamGroups(hyper));
        var parameters = method.TrainableTensors.Select(t => t.Tensor).ToList();
        if (o.InitDir is { } initDir) WriteInit(Path.Combine(initDir, c.FileName), method, optimizer, spec, c);

        var losses = new List<Tensor>();
        var timer = new Stopwatch();
        var timedSteps = 0;
        try
        {
            for (var s = 0; s < batches.Length; s++)
            {
                if (s == o.Warmup)
                {
                    if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index);
                    timer.Start();
                }
                var loss = DisposeScope.Keep(Tensor.Zeros([], ScalarType.Float32, device));
                losses.Add(loss);
                Trainer.Step(model, method, [batches[s]], hyper, s, parameters, optimizer, loss);
                if (s >= o.Warmup) timedSteps++;
                if (o.PastDeadline && s + 1 < batches.Length) break;
            }
            if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index);
            timer.Stop();
            var values = losses.Select(l => Round(l.ItemDouble(), 5)).ToArray();
            string? trace = null;
            if (o.Profile.Contains(c.Label) && o.ProfileDir is { } profileDir && !o.PastDeadline)
            {
                var sink = DisposeScope.Keep(Tensor.Zeros([], ScalarType.Float32, device));
                losses.Add(sink);
                trace = ProfileStep(Path.Combine(profileDir, $"{c.FileName}-ours.trace.json"),
                    () => Trainer.Step(model, method, [batches[0]], hyper, batches.Length, parameters, optimizer, sink), device);
            }
            var tokensPerStep = (double)o.Batch * o.Seq;
            var seconds = timer.Elapsed.TotalSeconds;
            var tps = timedSteps > 0 && seconds > 0 ? timedSteps * tokensPerStep / seconds : double.NaN;
            var flopsPerToken = 4.0 * baseParams + 6.0 * method.TrainableParameterCount;
            return new JsonObject
            {
                ["config"] = c.Label,
                ["status"] = timedSteps == o.Steps ? "ok" : "partial",
                ["note"] = timedSteps == o.Steps ? "" : $"{timedSteps} of {o.Steps} timed steps (time budget)",
                ["method"] = JsonSerializer.SerializeToNode(spec, DomainJson.Options),
                ["adapter_dtype"] = c.AdapterDtype,
                ["gradient_checkpointing"] = c.GradientCheckpointing,
                ["trainable_params"] = method.TrainableParameterCount,
                ["timed_steps"] = timedSteps,
                ["step_ms"] = Round(timedSteps > 0 ? seconds * 1000 / timedSteps : double.NaN, 1),
                ["tokens_per_s"] = Round(tps, 1),
                ["peak_mem_gb"] = device.Kind == DeviceKind.Cuda ? Round(Cuda.MaxMemoryAllocated(device.Index) / 1e9, 2) : null,
                ["flops_per_token"] = flopsPerToken,
                ["mfu"] = Round(flopsPerToken * tps / peakFlops, 4),
                ["wall_seconds"] = Round(wall.Elapsed.TotalSeconds, 1),
                ["profile_trace"] = trace,
                ["losses"] = new JsonArray(values.Select(v => (JsonNode?)JsonValue.Create(v)).ToArray()),
            };
        }
        finally
        {
            foreach (var l in losses) l.Dispose();
        }
    }

    /// <summary>One step under the kernel profiler; returns the trace's path or the reason there is none.</summary>
    private static string ProfileStep(string path, Action step, Device device)
    {
        if (!KernelProfiler.Available(out var why)) return $"no profile: {why}";
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index);
        KernelProfiler.Start();
        try
        {
            step();
            if (device.Kind == DeviceKind.Cuda) Cuda.Synchronize(device.Index);
        }
        finally { KernelProfiler.Stop(path); }
        return path;
    }

    /// <summary>The configuration's initial adapter tensors (PEFT names, as in adapter_model.safetensors) and each
    /// tensor's learning rate and weight decay, so that the PEFT side can start from the same values.</summary>
    private static void WriteInit(string dir, IAdapterMethod method, AdamW optimizer, MethodSpec spec, BenchConfig c)
    {
        Directory.CreateDirectory(dir);
        Safetensors.Save(Path.Combine(dir, "adapter_model.safetensors"), method.TrainableTensors.ToDictionary(t => t.Name, t => t.Tensor),
            new Dictionary<string, string> { ["format"] = "pt" });
        var byTensor = new Dictionary<Tensor, string>(ReferenceEqualityComparer.Instance);
        foreach (var (name, t) in method.TrainableTensors) byTensor[t] = name;
        var groups = new JsonObject();
        foreach (var g in optimizer.Groups)
            foreach (var p in g.Parameters)
                if (byTensor.TryGetValue(p, out var name))
                    groups[name] = new JsonObject { ["lr"] = g.LearningRate, ["weight_decay"] = g.WeightDecay };
        var info = new JsonObject
        {
            ["config"] = c.Label,
            ["method"] = JsonSerializer.SerializeToNode(spec, DomainJson.Options),
            ["adapter_dtype"] = c.AdapterDtype,
            ["gradient_checkpointing"] = c.GradientCheckpointing,
            ["param_groups"] = groups,
        };
        File.WriteAllText(Path.Combine(dir, "bench_init.json"), info.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    private static string TrainMarkdown(JsonObject t)
    {
        var sb = new StringBuilder();
        sb.Append($"Training step (ours): model {t["model"]}, {t["base_matmul_params"]} matmul params, {t["dtype"]} base, batch {t["batch"]} x {t["seq"]}, ");
        sb.Append($"{t["warmup"]} warm-up + {t["steps"]} timed steps, lr {t["lr"]}; MFU over {t["peak_tflops"]} TFLOP/s ({t["peak_kind"]}).\n\n");
        sb.Append("| config | status | trainable | tokens/s | step ms | peak GB | MFU | first loss | last loss | note |\n");
        sb.Append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        foreach (var node in t["results"]!.AsArray())
        {
            var r = node!.AsObject();
            var losses = r["losses"]?.AsArray();
            string F(string key, string format) => Number(r[key]) is { } d ? d.ToString(format, CultureInfo.InvariantCulture) : "-";
            var mfu = Number(r["mfu"]) is { } md ? (md * 100).ToString("F1", CultureInfo.InvariantCulture) + "%" : "-";
            sb.Append($"| {r["config"]} | {r["status"]} | {F("trainable_params", "N0")} | {F("tokens_per_s", "N0")} | {F("step_ms", "F1")} | {F("peak_mem_gb", "F2")} | {mfu} | ");
            sb.Append($"{(losses is { Count: > 0 } ? losses[0]!.ToString() : "-")} | {(losses is { Count: > 0 } ? losses[^1]!.ToString() : "-")} | {r["note"]} |\n");
        }
        return sb.Append('\n').ToString();
    }

    /// <summary>A finite number held by a JSON node (any numeric type), else null.</summary>
    public static double? Number(JsonNode? node)
    {
        if (node is not JsonValue v) return null;
        if (v.TryGetValue<double>(out var d)) return double.IsFinite(d) ? d : null;
        if (v.TryGetValue<long>(out var l)) return l;
        if (v.TryGetValue<int>(out var i)) return i;
        return null;
    }

    private static double Median(List<double> xs)
    {
        var s = xs.Order().ToArray();
        return s.Length == 0 ? double.NaN : s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
    }

    /// <summary>Rounded, or null (JSON null) when not finite.</summary>
    private static double? Round(double x, int digits) => double.IsFinite(x) ? Math.Round(x, digits) : null;

    private static string Shorten(string s) => s.Length <= 300 ? s.ReplaceLineEndings(" ") : s[..300].ReplaceLineEndings(" ") + "…";
}

internal sealed class BenchUsageException(string message) : Exception(message);

/// <summary>A configuration that cannot run in this build (its method is not registered, its options do not parse).</summary>
internal sealed class BenchSkip(string message) : Exception(message);

/// <summary>One benchmark row: a method with options, adapter precision and checkpointing.</summary>
public sealed record BenchConfig(string Label, string Type, string? OptionsJson, string AdapterDtype, bool GradientCheckpointing)
{
    /// <summary>The benchmark's options per method (issue 7's settings; all 7 linears). Alternatives are tried in
    /// order with strict parsing, so option names that differ between builds are found without guessing silently.</summary>
    private static readonly Dictionary<string, string[]> Presets = new()
    {
        ["lora"] = ["""{"r":32,"alpha":64}"""],
        ["dora"] = ["""{"r":32,"alpha":64}"""],
        ["bone"] = ["""{"r":64}"""],
        ["bat"] = ["""{"r":64}"""],
        ["vblora"] = ["""{"r":4,"numVectors":2048,"vectorLength":256,"topk":2}""", """{"r":4,"h":2048,"b":256,"k":2}""",
                      """{"r":4,"numVectors":2048,"vectorLength":256}""", """{"r":4,"h":2048,"b":256}"""],
    };

    public string FileName => Label.Replace('+', '_').Replace('=', '_');

    /// <summary><c>name[+gc][+bf16|+mixed]</c> or <c>label=JSON</c> (JSON with a "type").</summary>
    public static BenchConfig Parse(string text)
    {
        var eq = text.IndexOf('=');
        if (eq > 0)
        {
            var label = text[..eq];
            var json = text[(eq + 1)..];
            var node = JsonNode.Parse(json)?.AsObject() ?? throw new BenchUsageException($"--configs {label}: empty JSON");
            var type = (string?)node["type"] ?? throw new BenchUsageException($"--configs {label}: the JSON needs a \"type\"");
            var (_, adapterDtype, gc) = Suffixes(label);
            return new BenchConfig(label, type, json, adapterDtype, gc);
        }
        var (name, dtype, checkpointing) = Suffixes(text);
        return new BenchConfig(text, name, null, dtype, checkpointing);
    }

    private static (string Name, string AdapterDtype, bool Gc) Suffixes(string label)
    {
        var parts = label.Split('+');
        var dtype = "fp32";
        var gc = false;
        foreach (var p in parts.Skip(1))
        {
            if (p == "gc") gc = true;
            else if (p is "bf16" or "fp32" or "mixed") dtype = p;
            else throw new BenchUsageException($"--configs {label}: unknown suffix '+{p}' (known: +gc, +bf16, +mixed)");
        }
        return (parts[0], dtype, gc);
    }

    public MethodSpec Resolve()
    {
        if (!MethodSpec.KnownTypes.Contains(Type))
            throw new BenchSkip($"method '{Type}' is not registered in this build (registered: {string.Join(", ", MethodSpec.KnownTypes)})");
        var candidates = OptionsJson is not null ? [OptionsJson] : Presets.GetValueOrDefault(Type, ["{}"]);
        var problems = new List<string>();
        foreach (var candidate in candidates)
        {
            var node = JsonNode.Parse(candidate)!.AsObject();
            node["type"] = Type;
            node["targetModules"] ??= new JsonArray(MethodSpec.AllModules.Select(m => (JsonNode)m).ToArray());
            // The discriminator must come first for the strict reader.
            var ordered = new JsonObject { ["type"] = Type };
            foreach (var (k, v) in node) if (k != "type") ordered[k] = v?.DeepClone();
            try { return JsonSerializer.Deserialize<MethodSpec>(ordered.ToJsonString(), DomainJson.Strict)!; }
            catch (JsonException e) { problems.Add(e.Message); }
        }
        throw new BenchSkip($"options of '{Type}' do not parse: {string.Join(" | ", problems)}");
    }
}

public sealed class BenchOptions
{
    public string Mode { get; private set; } = "all";
    public Device Device { get; private set; } = Device.Cpu;
    public string? JsonPath { get; private set; }
    public string? MarkdownPath { get; private set; }
    public int MatmulSize { get; private set; } = 8192;
    public int CpuMatmulSize { get; private set; } = 1024;
    /// <summary>Fewer CPU micro-benchmark iterations (the smoke test).</summary>
    public bool QuickMicro { get; private set; }
    public string Preset { get; private set; } = "small";
    public string? ModelDir { get; private set; }
    public List<BenchConfig> Configs { get; private set; } = [];
    public int Batch { get; private set; }
    public int Seq { get; private set; }
    public int Warmup { get; private set; } = 3;
    public int Steps { get; private set; } = 10;
    public double LearningRate { get; private set; } = 1e-3;
    public long Seed { get; private set; } = 1234;
    public ScalarType DType { get; private set; } = ScalarType.BFloat16;
    public string? TokensPath { get; private set; }
    public double? PeakTflops { get; private set; }
    public string? InitDir { get; private set; }
    public HashSet<string> Profile { get; private set; } = [];
    public string? ProfileDir { get; private set; }
    private DateTime? _deadline;

    public bool PastDeadline => _deadline is { } d && DateTime.UtcNow > d;

    public static BenchOptions Parse(string[] args)
    {
        var o = new BenchOptions();
        var i = 0;
        if (args.Length > 0 && !args[0].StartsWith('-')) o.Mode = args[i++];
        if (o.Mode is not ("micro" or "train" or "all")) throw new BenchUsageException($"unknown bench mode '{o.Mode}'");
        string? device = null, preset = null, configs = null;
        int? batch = null, seq = null;
        while (i < args.Length)
        {
            var key = args[i++];
            if (key == "--quick") { o.QuickMicro = true; continue; }
            if (i >= args.Length) throw new BenchUsageException($"{key} needs a value");
            var v = args[i++];
            switch (key)
            {
                case "--device": device = v; break;
                case "--json": o.JsonPath = v; break;
                case "--md": o.MarkdownPath = v; break;
                case "--deadline": o._deadline = DateTime.UtcNow.AddSeconds(Num(key, v)); break;
                case "--size": o.MatmulSize = (int)Num(key, v, 1, 65536); break;
                case "--cpu-size": o.CpuMatmulSize = (int)Num(key, v, 1, 16384); break;
                case "--preset": preset = v; break;
                case "--model": o.ModelDir = v; break;
                case "--configs": configs = v; break;
                case "--batch": batch = (int)Num(key, v, 1, 1024); break;
                case "--seq": seq = (int)Num(key, v, 8, 131072); break;
                case "--warmup": o.Warmup = (int)Num(key, v, 0, 100000); break;
                case "--steps": o.Steps = (int)Num(key, v, 1, 100000); break;
                case "--lr": o.LearningRate = Num(key, v, 1e-12, 1); break;
                case "--seed": o.Seed = (long)Num(key, v, 0, long.MaxValue); break;
                case "--dtype":
                    o.DType = v switch
                    {
                        "bf16" => ScalarType.BFloat16, "fp16" => ScalarType.Float16, "fp32" => ScalarType.Float32,
                        _ => throw new BenchUsageException("--dtype must be bf16, fp16 or fp32"),
                    };
                    break;
                case "--tokens": o.TokensPath = v; break;
                case "--peak-tflops": o.PeakTflops = Num(key, v, 1e-6, 1e6); break;
                case "--init-dir": o.InitDir = v; break;
                case "--profile": o.Profile = v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToHashSet(); break;
                case "--profile-dir": o.ProfileDir = v; break;
                default: throw new BenchUsageException($"unknown option {key}");
            }
        }
        o.Device = device is null ? (Cuda.IsAvailable() ? Device.Cuda() : Device.Cpu) : ParseDevice(device);
        var cuda = o.Device.Kind == DeviceKind.Cuda;
        if (cuda && (!Cuda.IsAvailable() || o.Device.Index >= Cuda.DeviceCount()))
            throw new BenchUsageException($"--device {o.Device}: libtorch sees {(Cuda.IsAvailable() ? Cuda.DeviceCount() : 0)} CUDA device(s)");
        o.Preset = preset ?? (cuda ? "1b" : "small");
        BenchModels.Preset(o.Preset);   // validates the name
        o.Batch = batch ?? (cuda ? 4 : 2);
        o.Seq = seq ?? (cuda ? 2048 : 128);
        o.Configs = (configs ?? (cuda ? "lora,lora+mixed,lora+bf16,lora+mixed+gc,dora,dora+mixed,bone,bone+mixed,bat,vblora,vblora+mixed" : "lora,bone"))
            .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(BenchConfig.Parse).ToList();
        return o;
    }

    private static Device ParseDevice(string s)
    {
        try { return Device.Parse(s); }
        catch (FormatException e) { throw new BenchUsageException($"--device: {e.Message}"); }
    }

    private static double Num(string key, string v, double min = double.MinValue, double max = double.MaxValue) =>
        double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d >= min && d <= max
            ? d : throw new BenchUsageException($"{key}: '{v}' is not a number in [{min}, {max}]");
}

/// <summary>Model shapes of the benchmark, built in memory with random weights (HF's init: N(0, 0.02), norms 1).</summary>
public static class BenchModels
{
    public static ModelConfig Preset(string name) => name switch
    {
        // Llama-3.2-1B's shapes (1.24B parameters, tied embeddings); rope θ at HF's default.
        "1b" => Shapes(vocab: 128256, hidden: 2048, intermediate: 8192, layers: 16, heads: 32, kvHeads: 8),
        // Sized for a 2-core CPU: a few tenths of a second per step.
        "small" => Shapes(vocab: 4096, hidden: 256, intermediate: 768, layers: 4, heads: 4, kvHeads: 2),
        // The test suite's smoke test.
        "tiny" => Shapes(vocab: 512, hidden: 128, intermediate: 256, layers: 2, heads: 2, kvHeads: 1),
        _ => throw new BenchUsageException($"unknown preset '{name}' (tiny, small, 1b)"),
    };

    private static ModelConfig Shapes(int vocab, int hidden, int intermediate, int layers, int heads, int kvHeads) => new()
    {
        Architectures = ["LlamaForCausalLM"], ModelType = "llama", VocabSize = vocab, HiddenSize = hidden,
        IntermediateSize = intermediate, NumHiddenLayers = layers, NumAttentionHeads = heads, NumKeyValueHeads = kvHeads,
        TieWordEmbeddings = true, RmsNormEps = 1e-5, RopeTheta = 10000, MaxPositionEmbeddings = 4096, TorchDtype = "bfloat16",
    };

    public static Llama Build(ModelConfig c, Device device, ScalarType dtype, long seed)
    {
        using var gen = new Generator(seed, device);
        var w = new Dictionary<string, Tensor>();
        using (DisposeScope.Begin())
        {
            Tensor Normal(params long[] shape) => DisposeScope.Keep((Tensor.Randn(shape, gen, ScalarType.Float32, device) * 0.02).To(dtype));
            Tensor Ones(long n) => DisposeScope.Keep(Tensor.Ones([n], dtype, device));
            w["model.embed_tokens.weight"] = Normal(c.VocabSize, c.HiddenSize);
            for (var l = 0; l < c.NumHiddenLayers; l++)
            {
                foreach (var m in c.LayerLinears()) w[$"{ModelConfig.ModulePath(l, m.Name)}.weight"] = Normal(m.Out, m.In);
                w[$"model.layers.{l}.input_layernorm.weight"] = Ones(c.HiddenSize);
                w[$"model.layers.{l}.post_attention_layernorm.weight"] = Ones(c.HiddenSize);
            }
            w["model.norm.weight"] = Ones(c.HiddenSize);
            if (!c.TieWordEmbeddings) w["lm_head.weight"] = Normal(c.VocabSize, c.HiddenSize);
        }
        return Llama.FromWeights(c, w, device, dtype);
    }

    /// <summary>N of the MFU formula: the weights every token multiplies (decoder linears and the LM head, tied or not).</summary>
    public static long MatmulParameters(ModelConfig c) =>
        (long)c.NumHiddenLayers * c.LayerLinears().Sum(m => (long)m.Out * m.In) + (long)c.VocabSize * c.HiddenSize;
}

/// <summary>
/// The benchmark's token stream, a pure function of (seed, index), generated the same way by
/// tests/bench/peft_bench.py: SplitMix64 draws, a cube-law skew over the first min(V, 1024) ranks (so there is a
/// unigram distribution to learn and the loss moves), ranks spread over the vocabulary.
/// </summary>
public static class BenchData
{
    public static int[] Tokens(long seed, long count, int vocab)
    {
        var ids = new int[count];
        var state = (ulong)seed;
        long k = Math.Min(vocab, 1024);
        for (long i = 0; i < count; i++)
        {
            var r = (TrainingData.SplitMix64(ref state) >> 11) * (1.0 / 9007199254740992.0);
            var rank = (long)(k * (r * r * r));
            ids[i] = (int)((rank * 7919 + 13) % vocab);
        }
        return ids;
    }

    public static int[] Read(string path, long count)
    {
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < count * 4) throw new BenchUsageException($"--tokens {path}: {bytes.Length / 4} ids, the run needs {count}");
        return MemoryMarshal.Cast<byte, int>(bytes.AsSpan(0, (int)(count * 4))).ToArray();
    }

    /// <summary>Rows of step <paramref name="step"/>; labels are the ids (shifted inside the loss), the first one -100,
    /// so the loss averages over batch × (seq − 1) tokens, as HF's does.</summary>
    public static HostBatch Batch(int[] tokens, int step, int batch, int seq)
    {
        var n = batch * seq;
        var ids = new long[n];
        var labels = new long[n];
        for (var j = 0; j < n; j++) ids[j] = labels[j] = tokens[(long)step * n + j];
        for (var b = 0; b < batch; b++) labels[b * seq] = -100;
        return new HostBatch(ids, labels, batch, seq, n, (long)batch * (seq - 1));
    }

    /// <summary>A checksum both sides print, so a report can tell whether they trained on the same tokens.</summary>
    public static string Check(int[] tokens)
    {
        ulong h = 1469598103934665603UL;
        foreach (var t in tokens.AsSpan(0, Math.Min(tokens.Length, 1 << 20))) h = (h ^ (uint)t) * 1099511628211UL;
        return $"{tokens.Length}:{h:x16}";
    }
}

/// <summary>
/// libfinetune_torch_profiler.so (native/profiler.cpp, built on demand on a CUDA host): libtorch's Kineto profiler
/// around a region, written as a Chrome trace. Loaded from FINETUNE_TORCH_PROFILER; absent, profiling is skipped.
/// </summary>
internal static unsafe class KernelProfiler
{
    private static readonly Lazy<(IntPtr Start, IntPtr Stop, IntPtr Error, string? Why)> Lib = new(() =>
    {
        var path = Environment.GetEnvironmentVariable("FINETUNE_TORCH_PROFILER");
        if (string.IsNullOrEmpty(path) || !File.Exists(path)) return (0, 0, 0, "FINETUNE_TORCH_PROFILER names no file");
        Native.EnsureLoaded();
        if (!NativeLibrary.TryLoad(path, out var h)) return (0, 0, 0, $"cannot load {path}");
        return (NativeLibrary.GetExport(h, "ft_profiler_start"), NativeLibrary.GetExport(h, "ft_profiler_stop"),
                NativeLibrary.GetExport(h, "ft_profiler_error"), null);
    });

    public static bool Available(out string why)
    {
        why = Lib.Value.Why ?? "";
        return Lib.Value.Why is null;
    }

    public static void Start()
    {
        if (((delegate* unmanaged<int>)Lib.Value.Start)() != 0) throw new TorchException("profiler: " + Error());
    }

    public static void Stop(string path)
    {
        var bytes = Encoding.UTF8.GetBytes(path + "\0");
        fixed (byte* p = bytes)
            if (((delegate* unmanaged<byte*, int>)Lib.Value.Stop)(p) != 0) throw new TorchException("profiler: " + Error());
    }

    private static string Error() => Marshal.PtrToStringUTF8(((delegate* unmanaged<IntPtr>)Lib.Value.Error)()) ?? "?";
}
