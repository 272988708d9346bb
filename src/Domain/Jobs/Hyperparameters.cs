using System.ComponentModel;

namespace FineTune.Domain.Jobs;

/// <summary>Training hyperparameters of a fine-tune job. Every field has a default, so a request may omit any.</summary>
public sealed record Hyperparameters
{
    /// <summary>Passes over the training data (ignored when <see cref="MaxSteps"/> is set).</summary>
    [DefaultValue(1)] public int Epochs { get; init; } = 1;
    /// <summary>Examples per micro-batch.</summary>
    [DefaultValue(4)] public int BatchSize { get; init; } = 4;
    /// <summary>Micro-batches accumulated into one optimizer step.</summary>
    [DefaultValue(1)] public int GradientAccumulationSteps { get; init; } = 1;
    /// <summary>Peak learning rate of AdamW.</summary>
    [DefaultValue(2e-4)] public double LearningRate { get; init; } = 2e-4;
    /// <summary>Decoupled weight decay of AdamW.</summary>
    [DefaultValue(0.0)] public double WeightDecay { get; init; }
    /// <summary>Examples are truncated to this many tokens.</summary>
    [DefaultValue(512)] public int MaxSeqLength { get; init; } = 512;
    /// <summary>Seed of every random choice: initialisation, data order, dropout.</summary>
    [DefaultValue(42)] public long Seed { get; init; } = 42;
    /// <summary>Linear warm-up steps.</summary>
    [DefaultValue(0)] public int WarmupSteps { get; init; }
    /// <summary>Learning-rate schedule after warm-up: constant, linear or cosine.</summary>
    [DefaultValue("cosine")] public string Scheduler { get; init; } = "cosine";
    /// <summary>Stop after this many optimizer steps (null: run the epochs).</summary>
    public int? MaxSteps { get; init; }
    /// <summary>Clip the global gradient norm to this value (0 disables).</summary>
    [DefaultValue(1.0)] public double MaxGradNorm { get; init; } = 1.0;
    /// <summary>Examples longer than maxSeqLength: "truncate" (cut, counted on the job) or "reject" (the submit fails with their line numbers).</summary>
    [DefaultValue("truncate")] public string Truncation { get; init; } = Datasets.Truncation.Truncate;
    /// <summary>Pack short examples together into rows of up to maxSeqLength tokens (each still attends only to itself).</summary>
    [DefaultValue(false)] public bool Packing { get; init; }
    /// <summary>Without validationData: this fraction of the training examples (chosen by seed) is held out for validation.</summary>
    [DefaultValue(0.0)] public double ValidationSplit { get; init; }
    /// <summary>Validation loss every N optimizer steps (and at the end); null: at every metrics row.</summary>
    public int? EvalEvery { get; init; }
    /// <summary>Recompute each decoder layer in backward instead of keeping its activations: much less memory,
    /// about a third more compute.</summary>
    [DefaultValue(false)] public bool GradientCheckpointing { get; init; }
    /// <summary>Precision of the trained adapter tensors and of their math. auto (default): mixed where the method
    /// supports it, else fp32. fp32: fp32 tensors and optimizer state and fp32 adapter math on a bf16 base (PEFT's
    /// default, bit-for-bit its arithmetic). mixed: fp32 tensors and optimizer state, the adapter math in the base's
    /// dtype, as torch.autocast does (HF Trainer's bf16=True): fp32 masters at bf16's speed. bf16: bf16 tensors and
    /// optimizer state: least memory. On an fp32 base every choice computes in fp32.</summary>
    [DefaultValue(AutoAdapterDtype)] public string AdapterDtype { get; init; } = AutoAdapterDtype;

    public const string AutoAdapterDtype = "auto";
    public static readonly string[] Schedulers = ["constant", "linear", "cosine"];
    public static readonly string[] AdapterDtypes = [AutoAdapterDtype, "fp32", "mixed", "bf16"];

    /// <summary>Field-level errors, keyed by the JSON path of the field (e.g. "hyperparameters.batchSize").</summary>
    public IEnumerable<(string Field, string Error)> Validate(string prefix = "hyperparameters")
    {
        if (Epochs is < 1 or > 100) yield return ($"{prefix}.epochs", "must be between 1 and 100");
        if (BatchSize is < 1 or > 1024) yield return ($"{prefix}.batchSize", "must be between 1 and 1024");
        if (GradientAccumulationSteps is < 1 or > 1024) yield return ($"{prefix}.gradientAccumulationSteps", "must be between 1 and 1024");
        if (!(LearningRate > 0 && LearningRate <= 1)) yield return ($"{prefix}.learningRate", "must be > 0 and <= 1");
        if (!(WeightDecay >= 0 && WeightDecay <= 1)) yield return ($"{prefix}.weightDecay", "must be between 0 and 1");
        if (MaxSeqLength is < 8 or > 131072) yield return ($"{prefix}.maxSeqLength", "must be between 8 and 131072");
        if (WarmupSteps is < 0 or > 1_000_000) yield return ($"{prefix}.warmupSteps", "must be between 0 and 1000000");
        if (!Schedulers.Contains(Scheduler)) yield return ($"{prefix}.scheduler", $"must be one of: {string.Join(", ", Schedulers)}");
        if (MaxSteps is < 1 or > 10_000_000) yield return ($"{prefix}.maxSteps", "must be between 1 and 10000000");
        if (!(MaxGradNorm >= 0 && MaxGradNorm <= 1e6)) yield return ($"{prefix}.maxGradNorm", "must be between 0 and 1e6");
        if (!Datasets.Truncation.All.Contains(Truncation)) yield return ($"{prefix}.truncation", "must be one of: truncate, reject");
        if (!(ValidationSplit >= 0 && ValidationSplit <= 0.5)) yield return ($"{prefix}.validationSplit", "must be between 0 and 0.5");
        if (EvalEvery is < 1 or > 10_000_000) yield return ($"{prefix}.evalEvery", "must be between 1 and 10000000");
        if (!AdapterDtypes.Contains(AdapterDtype)) yield return ($"{prefix}.adapterDtype", $"must be one of: {string.Join(", ", AdapterDtypes)}");
    }
}
