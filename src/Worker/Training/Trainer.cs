using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods;
using FineTune.Worker.Training.Model;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Training;

/// <summary>Everything one training run needs. <paramref name="ResumeFrom"/>: a checkpoint file written by an earlier
/// attempt of the same job. <paramref name="DatasetSha256"/> is recorded in metadata.json and checked on resume.
/// <paramref name="Merge"/>: also write the merged full model (<see cref="MergedModel"/>) into the output folder.</summary>
public sealed record TrainingSpec(string ModelDir, ITokenizer Tokenizer, IReadOnlyList<DatasetExample> Train,
    IReadOnlyList<DatasetExample>? Validation, MethodSpec Method, Hyperparameters Hyper, Device Device, ScalarType ComputeDType,
    string CheckpointDir, string? ResumeFrom, string OutputDir, int LogEvery = 10, int CheckpointEvery = 50,
    string BaseModelName = "", string? DatasetSha256 = null, bool Merge = false)
{
    public string? ValidationSha256 { get; init; }
    /// <summary>Where the base model came from (file:// or https:// folder) and its verified weights checksum.</summary>
    public string? BaseModelUri { get; init; }
    public string? BaseModelSha256 { get; init; }
}

/// <summary>How the training data was prepared, for metadata.json.</summary>
public sealed record DataPreparation(int TrainExamples, int Rows, int Truncated, int Skipped, string ValidationSource, int ValidationExamples);

public sealed record TrainingMetrics(long Step, long TotalSteps, double Loss, double LearningRate, double TokensPerSecond,
    double ElapsedSeconds, double? ValidationLoss);

/// <summary>How the loop reports to the job runner. Any call may throw to stop the run.</summary>
public interface ITrainingReporter
{
    ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct);
    ValueTask OnMetricsAsync(TrainingMetrics metrics, CancellationToken ct);
    /// <summary>The runner's fencing check (is this worker still the job's owner?); throws to abort.</summary>
    ValueTask BeforeCheckpointAsync(long step, CancellationToken ct);
    ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct);
}

public sealed record TrainingResult(long Steps, double FinalLoss, double? FinalValidationLoss, long TokensSeen,
    string OutputDir, IReadOnlyList<string> Files);

/// <summary>
/// The training loop: AdamW over the method's parameter groups, warm-up + schedule, gradient accumulation with the loss
/// normalised over all label tokens of the step, global-norm clipping, checkpoints, cancellation. The loss stays on
/// the device and is read back only when metrics are logged, so the GPU never waits for the host between steps.
/// Scopes and no-grad sections never span an await (both are thread-local).
/// </summary>
public sealed class Trainer
{
    public const string MetadataFile = "metadata.json";

    public async Task<TrainingResult> RunAsync(TrainingSpec spec, ITrainingReporter reporter, CancellationToken ct)
    {
        var clock = Stopwatch.StartNew();
        var hyper = spec.Hyper;
        Validate(spec);
        ct.ThrowIfCancellationRequested();

        var (data, validation, prepared) = PrepareData(spec);
        // bf16/fp16 matmuls on the CPU are slow or missing in libtorch 1.13; the CPU computes in fp32.
        var dtype = spec.Device.Kind == DeviceKind.Cpu ? ScalarType.Float32 : spec.ComputeDType;

        UseDevice(spec.Device);
        using var model = Llama.Load(spec.ModelDir, spec.Device, dtype);
        model.GradientCheckpointing = hyper.GradientCheckpointing;
        CheckVocabulary(data.Examples.Concat(validation ?? []), model.Config.VocabSize);
        using var method = AdapterMethods.Attach(spec.Method, model, hyper.Seed);
        SetAdapterPrecision(method, hyper.AdapterDtype);
        using var optimizer = new AdamW(method.ParamGroups(hyper));
        var parameters = method.TrainableTensors.Select(t => t.Tensor).ToList();
        var totalSteps = TotalSteps(hyper, data.Count);

        var state = new LoopState(0, new DataPosition(0, 0), 0, 0, 0);
        if (spec.ResumeFrom is { } resume)
            state = Checkpoint.Restore(resume, method, optimizer, hyper, data.Count);
        var resumedFrom = state.Step;
        await reporter.OnStartedAsync(totalSteps, resumedFrom, ct);

        using var lossWindow = Keep(Tensor.Full([], state.LossWindowSum, ScalarType.Float32, spec.Device));
        var (step, position, tokensSeen, windowSteps) = (state.Step, state.Position, state.TokensSeen, state.LossWindowSteps);
        var windowClock = Stopwatch.StartNew();
        long windowTokens = 0;
        double lastLoss = double.NaN;
        double? lastValidation = null;

        while (step < totalSteps)
        {
            ct.ThrowIfCancellationRequested();
            var factor = LrSchedule.Factor(hyper.Scheduler, step, totalSteps, hyper.WarmupSteps);
            optimizer.SetLearningRateFactor(factor);
            var stepTokens = TrainStep(model, method, data, ref position, hyper, step, parameters, optimizer, lossWindow);
            step++;
            windowSteps++;
            tokensSeen += stepTokens;
            windowTokens += stepTokens;

            var logNow = step % spec.LogEvery == 0 || step == totalSteps;
            // Validation at every metrics row, or every evalEvery steps (and at the end) when set.
            var evalNow = validation is not null && (hyper.EvalEvery is { } every ? step % every == 0 || step == totalSteps : logNow);
            if (logNow || evalNow)
            {
                lastLoss = lossWindow.ItemDouble() / windowSteps;     // the one host sync per log interval
                lossWindow.Zero_();
                windowSteps = 0;
                double? rowValidation = null;
                if (evalNow) rowValidation = lastValidation = ValidationLoss(model, method, validation!, hyper.BatchSize, spec.Tokenizer.PadId);
                var seconds = windowClock.Elapsed.TotalSeconds;
                await reporter.OnMetricsAsync(new TrainingMetrics(step, totalSteps, lastLoss, hyper.LearningRate * factor,
                    seconds > 0 ? windowTokens / seconds : 0, clock.Elapsed.TotalSeconds, rowValidation), ct);
                windowTokens = 0;
                windowClock.Restart();
            }

            if (step % spec.CheckpointEvery == 0 && step < totalSteps)
            {
                await reporter.BeforeCheckpointAsync(step, ct);
                var loopState = new LoopState(step, position, tokensSeen, lossWindow.ItemDouble(), windowSteps);
                var path = Checkpoint.Write(spec.CheckpointDir, loopState, method, optimizer, hyper.Seed, hyper, data.Count);
                var (sha, size) = Checkpoint.Hash(path);
                await reporter.OnCheckpointAsync(step, path, sha, size, ct);
            }
        }

        ct.ThrowIfCancellationRequested();
        var files = WriteOutput(spec, model, method, prepared, step, tokensSeen, lastLoss, lastValidation);
        return new TrainingResult(step, lastLoss, lastValidation, tokensSeen, spec.OutputDir, files);
    }

    /// <summary>One optimizer step over <c>GradientAccumulationSteps</c> micro-batches; returns the tokens it read.</summary>
    private static long TrainStep(Llama model, IAdapterMethod method, TrainingData data, ref DataPosition position,
                                  Hyperparameters hyper, long step, IReadOnlyList<Tensor> parameters, AdamW optimizer, Tensor lossWindow)
    {
        var batches = new HostBatch[hyper.GradientAccumulationSteps];
        for (var i = 0; i < batches.Length; i++) batches[i] = data.NextBatch(ref position);
        Step(model, method, batches, hyper, step, parameters, optimizer, lossWindow);
        return batches.Sum(b => b.Tokens);
    }

    /// <summary>
    /// One optimizer step over the given micro-batches (the training loop's step, also what the benchmark times).
    /// Adds the step's mean loss to <paramref name="lossWindow"/> on the device; nothing in here waits for the GPU
    /// (batches are uploaded asynchronously from page-locked memory, clipping stays on the device, no value is read).
    /// </summary>
    public static void Step(Llama model, IAdapterMethod method, IReadOnlyList<HostBatch> batches, Hyperparameters hyper, long step,
                            IReadOnlyList<Tensor> parameters, AdamW optimizer, Tensor lossWindow)
    {
        var device = model.Device;
        // The current CUDA device is per thread, and an async job resumes on any pool thread: set it every step.
        UseDevice(device);
        method.BeginStep(step);
        // Normalise by all label tokens of the step, so every token weighs the same whatever micro-batch it is in.
        double lossTokens = Math.Max(1, batches.Sum(b => b.LossTokens));
        for (var i = 0; i < batches.Count; i++)
        {
            var b = batches[i];
            using var scope = DisposeScope.Begin();
            // Dropout masks are seeded per (job seed, step, micro-batch, layer), never from a generator the device's
            // other jobs share: a resumed run draws the same masks, whatever else runs on the node.
            method.BeginMicroBatch(step, i);
            var ids = Tensor.FromAsync<long>(b.Ids, [b.Rows, b.Length], device);
            var labels = Tensor.FromAsync<long>(b.Labels, [b.Rows, b.Length], device);
            var (positions, mask) = PackedInputs(b, device);
            var loss = model.Loss(ids, labels, "sum", positions, mask) / lossTokens;
            loss.Backward();
            lossWindow.Add_(loss.Detach());
        }
        using (DisposeScope.Begin())
            method.Penalty()?.Backward();
        method.EndBackward();
        if (hyper.MaxGradNorm > 0) ClipGradNorm(parameters, hyper.MaxGradNorm);
        optimizer.Step();
        optimizer.ZeroGrad();
        method.AfterOptimizerStep(step, optimizer);
    }

    /// <summary>Makes a CUDA device the calling thread's current one (nothing on the CPU).</summary>
    public static void UseDevice(Device device)
    {
        if (device.Kind == DeviceKind.Cuda) Cuda.SetDevice(device.Index);
    }

    /// <summary>
    /// <c>adapterDtype</c>: the methods create fp32 tensors; for bf16 they are converted in place before the optimizer
    /// sees them (its state then is bf16 too). Layers compute in their tensors' dtype, except with mixed: fp32 tensors
    /// and optimizer state, the layers' math in the base's dtype.
    /// </summary>
    public static void SetAdapterPrecision(IAdapterMethod method, string adapterDtype)
    {
        adapterDtype = method.Spec.EffectiveAdapterDtype(adapterDtype);
        if (adapterDtype == "mixed" && !method.Spec.SupportsMixedAdapters)
            throw new ArgumentException($"hyperparameters.adapterDtype: method '{method.Spec.Type}' does not support mixed precision");
        foreach (var layer in method.Layers.Values) layer.Mixed = adapterDtype == "mixed";
        var dtype = adapterDtype switch
        {
            "fp32" or "mixed" => ScalarType.Float32,
            "bf16" => ScalarType.BFloat16,
            _ => throw new ArgumentException($"hyperparameters.adapterDtype: must be one of: {string.Join(", ", Hyperparameters.AdapterDtypes)}"),
        };
        using var noGrad = Torch.Torch.NoGrad();
        foreach (var (_, t) in method.TrainableTensors)
        {
            if (t.DType == dtype || t.DType is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16)) continue;
            using var scope = DisposeScope.Begin();
            t.SetData_(t.Detach().To(dtype));
        }
    }

    /// <summary>Position ids and the block-diagonal attention mask of a packed batch; nulls for an unpacked one.</summary>
    public static (Tensor? Positions, Tensor? Mask) PackedInputs(HostBatch b, Device device)
    {
        if (b.Positions is null || b.Segments is null) return (null, null);
        var positions = Tensor.From(b.Positions, b.Rows, b.Length).To(device);
        return (positions, Llama.PackedMask(Tensor.From(b.Segments, b.Rows, b.Length).To(device)));
    }

    /// <summary>
    /// Encodes the examples under the truncation policy; takes the validation set from the validation file, or holds
    /// out <c>validationSplit</c> of the training examples (seeded); packs the training rows when asked. Validation
    /// examples are never packed, so validation loss compares across runs with and without packing.
    /// </summary>
    public static (TrainingData Data, List<EncodedExample>? Validation, DataPreparation Prepared) PrepareData(TrainingSpec spec)
    {
        var hyper = spec.Hyper;
        var train = TrainingData.Encode(spec.Train, spec.Tokenizer, hyper.MaxSeqLength, hyper.Truncation, out var skipped, out var truncated);
        List<EncodedExample>? validation = null;
        var source = "none";
        if (spec.Validation is { Count: > 0 } v)
        {
            validation = TrainingData.Encode(v, spec.Tokenizer, hyper.MaxSeqLength, hyper.Truncation, out _, out _);
            source = "file";
        }
        else if (hyper.ValidationSplit > 0)
        {
            (train, validation) = TrainingData.Split(train, hyper.ValidationSplit, hyper.Seed);
            source = "split";
        }
        if (validation is { Count: 0 }) (validation, source) = (null, "none");
        var data = TrainingData.FromEncoded(train, skipped, hyper.BatchSize, spec.Tokenizer.PadId, hyper.Seed, hyper.Packing, hyper.MaxSeqLength);
        return (data, validation, new DataPreparation(train.Count, data.Count, truncated, skipped, source, validation?.Count ?? 0));
    }

    /// <summary>
    /// Scales gradients so their global L2 norm is at most <paramref name="maxNorm"/>, entirely on the device
    /// (torch's clip_grad_norm_ math: coef = min(1, maxNorm / (norm + 1e-6)), multi-tensor norms, a handful of kernels
    /// for all adapter tensors). The binding's GradClip.ClipGradNorm returns the norm as a double, which would force a
    /// host sync every step.
    /// </summary>
    public static void ClipGradNorm(IReadOnlyList<Tensor> parameters, double maxNorm) => GradClip.ClipGradNormAsync(parameters, maxNorm);

    /// <summary>Mean next-token loss over the validation examples (fixed order, dropout off).</summary>
    public static double ValidationLoss(Llama model, IAdapterMethod method, IReadOnlyList<EncodedExample> examples, int batchSize, int padId)
    {
        method.Train(false);
        try
        {
            UseDevice(model.Device);
            using var noGrad = Torch.Torch.NoGrad();
            using var total = Keep(Tensor.Zeros([], ScalarType.Float32, model.Device));
            long tokens = 0;
            for (var i = 0; i < examples.Count; i += batchSize)
            {
                using var scope = DisposeScope.Begin();
                var b = TrainingData.Collate(examples.Skip(i).Take(batchSize).ToList(), padId);
                var ids = Tensor.FromAsync<long>(b.Ids, [b.Rows, b.Length], model.Device);
                var labels = Tensor.FromAsync<long>(b.Labels, [b.Rows, b.Length], model.Device);
                total.Add_(model.Loss(ids, labels, "sum"));
                tokens += b.LossTokens;
            }
            return tokens == 0 ? double.NaN : total.ItemDouble() / tokens;
        }
        finally { method.Train(true); }
    }

    public static long TotalSteps(Hyperparameters hyper, int examples) =>
        hyper.MaxSteps ?? Math.Max(1, (long)Math.Ceiling((double)hyper.Epochs * examples / ((long)hyper.BatchSize * hyper.GradientAccumulationSteps)));

    /// <summary>A libtorch seed per (job seed, step): SplitMix64 of both, kept non-negative.</summary>
    public static long StepSeed(long seed, long step)
    {
        var s = (ulong)seed ^ ((ulong)step * 0xD1B54A32D192ED03UL);
        return (long)(TrainingData.SplitMix64(ref s) >> 1);
    }

    private static void Validate(TrainingSpec spec)
    {
        var errors = spec.Hyper.Validate().Concat(spec.Method.Validate()).Concat(spec.Method.ValidateWith(spec.Hyper)).Select(e => $"{e.Field}: {e.Error}").ToList();
        if (spec.LogEvery < 1) errors.Add("logEvery must be positive");
        if (spec.CheckpointEvery < 1) errors.Add("checkpointEvery must be positive");
        if (spec.Train.Count == 0) errors.Add("the training set is empty");
        if (!AdapterMethods.IsSupported(spec.Method)) errors.Add($"method '{spec.Method.Type}' is not supported by this worker");
        if (errors.Count > 0) throw new ArgumentException(string.Join("; ", errors));
    }

    private static void CheckVocabulary(IEnumerable<EncodedExample> examples, int vocabSize)
    {
        foreach (var e in examples)
            if (e.Ids.Any(id => id < 0 || id >= vocabSize))
                throw new DatasetEncodingException(e.Line, $"token id {e.Ids.First(id => id < 0 || id >= vocabSize)} is outside the model's vocabulary ({vocabSize}); tokenizer and model do not match");
    }

    private static IReadOnlyList<string> WriteOutput(TrainingSpec spec, Llama model, IAdapterMethod method, DataPreparation data, long steps,
                                                     long tokensSeen, double finalLoss, double? finalValidation)
    {
        Directory.CreateDirectory(spec.OutputDir);
        var files = method.Save(spec.OutputDir, spec.BaseModelName).ToList();
        JsonObject? merged = null;
        if (spec.Merge) files.AddRange(MergedModel.Write(spec.OutputDir, model, method, spec.ModelDir, out merged));
        var json = Checkpoint.Json;
        var metadata = new JsonObject
        {
            ["format_version"] = 1,
            ["method"] = JsonSerializer.SerializeToNode(spec.Method, json),
            ["hyperparameters"] = JsonSerializer.SerializeToNode(spec.Hyper, json),
            ["base_model"] = new JsonObject
            {
                ["name"] = spec.BaseModelName,
                ["uri"] = spec.BaseModelUri,
                ["weights_sha256"] = spec.BaseModelSha256,
                ["files"] = BaseModelFiles(spec.ModelDir),
            },
            ["dataset_sha256"] = spec.DatasetSha256,
            ["validation_dataset_sha256"] = spec.ValidationSha256,
            ["seed"] = spec.Hyper.Seed,
            ["steps"] = steps,
            ["tokens_seen"] = tokensSeen,
            ["train_examples"] = data.TrainExamples,
            ["skipped_examples"] = data.Skipped,
            ["validation_examples"] = data.ValidationExamples,
            ["data"] = new JsonObject
            {
                ["shuffle"] = "seeded per epoch (seed)",
                ["truncation"] = spec.Hyper.Truncation,
                ["truncated_examples"] = data.Truncated,
                ["packing"] = spec.Hyper.Packing,
                ["rows"] = data.Rows,
                ["validation"] = data.ValidationSource,
                ["validation_split"] = spec.Hyper.ValidationSplit,
                ["eval_every"] = spec.Hyper.EvalEvery,
            },
            ["trainable_parameters"] = method.TrainableParameterCount,
            ["lora_export"] = method.ExportInfo?.DeepClone(),
            ["merged"] = merged,
            ["final_loss"] = double.IsFinite(finalLoss) ? finalLoss : null,
            ["final_validation_loss"] = finalValidation is { } fv && double.IsFinite(fv) ? fv : null,
            ["created_utc"] = DateTime.UtcNow.ToString("O"),
        };
        AdapterFiles.WriteJson(Path.Combine(spec.OutputDir, MetadataFile), metadata);
        files.Add(MetadataFile);
        return files;
    }

    /// <summary>sha256 of the base model's weight files and config, so an adapter names exactly what it was trained on.</summary>
    private static JsonArray BaseModelFiles(string modelDir)
    {
        var files = Directory.EnumerateFiles(modelDir)
            .Where(f => f.EndsWith(".safetensors", StringComparison.Ordinal) || Path.GetFileName(f) is "config.json" or "model.safetensors.index.json")
            .Order(StringComparer.Ordinal);
        var array = new JsonArray();
        foreach (var f in files)
        {
            var (sha, size) = Checkpoint.Hash(f);
            array.Add(new JsonObject { ["name"] = Path.GetFileName(f), ["sha256"] = sha, ["size"] = size });
        }
        return array;
    }

    private static Tensor Keep(Tensor t)
    {
        DisposeScope.Keep(t);
        return t;
    }
}
