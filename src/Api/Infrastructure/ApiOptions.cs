namespace FineTune.Api.Infrastructure;

/// <summary>Where models, datasets and artifacts live (section "Storage").</summary>
public sealed class StorageOptions
{
    public const string Section = "Storage";
    /// <summary>Base folder; the defaults below are its models/, datasets/ and artifacts/ subfolders.</summary>
    public string Root { get; set; } = ".data";
    /// <summary>Folders a <c>file://</c> model reference may point into.</summary>
    public string[] ModelRoots { get; set; } = [];
    /// <summary>Folders a <c>file://</c> dataset reference may point into.</summary>
    public string[] DataRoots { get; set; } = [];
    /// <summary>Base of relative adapter and checkpoint paths.</summary>
    public string? ArtifactRoot { get; set; }
    /// <summary>Local copies of https:// models (shared with the workers, like the artifact root).</summary>
    public string? ModelCache { get; set; }

    public IReadOnlyList<string> EffectiveModelRoots => Roots(ModelRoots, "models");
    public IReadOnlyList<string> EffectiveDataRoots => Roots(DataRoots, "datasets");
    public string EffectiveArtifactRoot => Path.GetFullPath(ArtifactRoot ?? Path.Combine(Root, "artifacts"));
    public string EffectiveModelCache => Path.GetFullPath(ModelCache ?? Path.Combine(Root, "model-cache"));

    private string[] Roots(string[] configured, string sub) =>
        [.. (configured.Length > 0 ? configured : [Path.Combine(Root, sub)]).Select(r => Path.TrimEndingDirectorySeparator(Path.GetFullPath(r)))];
}

/// <summary>Submission rules (root keys "Pools", "Models", sections "Api" and "Estimates").</summary>
public sealed class SubmissionOptions
{
    /// <summary>Pools a job may ask for (config "Pools"; default ["cpu"]).</summary>
    public string[] Pools { get; set; } = ["cpu"];
    /// <summary>Model names → folders (config "Models"): seeded into the base-model registry at start.</summary>
    public Dictionary<string, string> Models { get; set; } = new(StringComparer.Ordinal);
    /// <summary>Training speed per pool (config "Estimates:TokensPerSecond:&lt;pool&gt;") for a job's duration estimate.</summary>
    public Dictionary<string, double> TokensPerSecond { get; set; } = new(StringComparer.Ordinal);
    /// <summary>Largest accepted request body (config "Api:MaxRequestBodyBytes").</summary>
    public long MaxRequestBodyBytes { get; set; } = 64 * 1024;

    public static SubmissionOptions From(IConfiguration config)
    {
        var o = new SubmissionOptions
        {
            Models = config.GetSection("Models").Get<Dictionary<string, string>>() ?? new(StringComparer.Ordinal),
            MaxRequestBodyBytes = config.GetValue<long?>("Api:MaxRequestBodyBytes") ?? 64 * 1024,
            TokensPerSecond = config.GetSection("Estimates:TokensPerSecond").Get<Dictionary<string, double>>() ?? new(StringComparer.Ordinal),
        };
        if (o.TokensPerSecond.Any(kv => !(kv.Value > 0)))
            throw new InvalidOperationException("Estimates:TokensPerSecond: every pool's speed must be a positive number");
        // Bound by hand: the binder appends configured array items to a non-empty default.
        var pools = config.GetSection("Pools").Get<string[]>();
        if (pools is { Length: > 0 }) o.Pools = pools;
        return o;
    }
}
