using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;

namespace FineTune.Api.Submission;

/// <summary>
/// How much work a job is, estimated at submit: the tokens its optimizer steps will read (the trainer's step count
/// over examples or packed rows, times the average tokens per row) and, when the pool's speed is configured
/// (<c>Estimates:TokensPerSecond:&lt;pool&gt;</c>), seconds at that speed. An estimate: padding, validation passes,
/// model loading and the real speed of the model on the pool's hardware are not in it.
/// </summary>
public sealed record JobEstimate(long Tokens, double? Seconds)
{
    /// <summary>Optimizer steps the job will run (the trainer's count: maxSteps, or epochs over examples or packed rows).</summary>
    public long Steps { get; init; }

    public static JobEstimate For(DatasetSummary training, Hyperparameters hp, bool separateValidation, double? tokensPerSecond)
    {
        var share = separateValidation ? 1.0 : 1.0 - hp.ValidationSplit;
        var tokensPerEpoch = training.Tokens * share;
        // Packed rows hold up to maxSeqLength tokens: at least this many rows.
        var rows = Math.Max(1.0, hp.Packing ? Math.Ceiling(tokensPerEpoch / hp.MaxSeqLength) : training.Examples * share);
        var rowsPerStep = (double)hp.BatchSize * hp.GradientAccumulationSteps;
        var steps = hp.MaxSteps ?? Math.Max(1, (long)Math.Ceiling(hp.Epochs * rows / rowsPerStep));
        var tokens = (long)Math.Round(steps * rowsPerStep * tokensPerEpoch / rows);
        return new JobEstimate(tokens, tokensPerSecond is > 0 ? Math.Round(tokens / tokensPerSecond.Value, 1) : null) { Steps = steps };
    }
}
