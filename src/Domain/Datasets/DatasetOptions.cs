using Microsoft.Extensions.Configuration;

namespace FineTune.Domain.Datasets;

/// <summary>Dataset limits (section "Datasets"), the same on the API (at submit) and on the workers.</summary>
public sealed class DatasetOptions
{
    public const string Section = "Datasets";
    /// <summary>Largest dataset file, local or downloaded.</summary>
    public long MaxBytes { get; set; } = DatasetLimits.Default.MaxBytes;
    /// <summary>Longest line (one example) in bytes.</summary>
    public int MaxLineBytes { get; set; } = DatasetLimits.Default.MaxLineBytes;
    /// <summary>Most examples (non-blank lines) in one file.</summary>
    public int MaxExamples { get; set; } = DatasetLimits.Default.MaxExamples;
    /// <summary>Bad lines listed in an error (all of them are counted).</summary>
    public int MaxErrors { get; set; } = DatasetLimits.Default.MaxErrors;

    public DatasetLimits Limits => new(MaxBytes, MaxLineBytes, MaxExamples, MaxErrors);

    public static DatasetOptions From(IConfiguration config)
    {
        var o = config.GetSection(Section).Get<DatasetOptions>() ?? new DatasetOptions();
        if (o.MaxBytes < 1 || o.MaxLineBytes < 1 || o.MaxExamples < 1 || o.MaxErrors < 1)
            throw new InvalidOperationException("Datasets:MaxBytes, MaxLineBytes, MaxExamples and MaxErrors must be positive");
        return o;
    }
}
