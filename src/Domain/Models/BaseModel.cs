namespace FineTune.Domain.Models;

/// <summary>
/// A registered base model: a name jobs may use instead of a URI, with the shapes read from its config.json and the
/// checksum of its weights (<see cref="WeightsDigest"/>). The registry is service-wide: every tenant sees the names.
/// </summary>
public sealed class BaseModel
{
    public const string FromApi = "api", FromConfig = "config";

    public Guid Id { get; init; } = Guid.CreateVersion7();
    public required string Name { get; init; }
    /// <summary>file:///folder or https://host/folder/.</summary>
    public required string Uri { get; set; }
    /// <summary>Weights checksum; null for an https model registered without one (then its weights are not verified).</summary>
    public string? Sha256 { get; set; }
    public required string Architecture { get; set; }
    public required string ModelType { get; set; }
    public int HiddenSize { get; set; }
    public int NumLayers { get; set; }
    public int VocabSize { get; set; }
    public int IntermediateSize { get; set; }
    public int NumAttentionHeads { get; set; }
    public int NumKeyValueHeads { get; set; }
    /// <summary>The linear modules of one decoder layer with their (out, in) shapes: what adapters target.</summary>
    public List<ModuleShape> Modules { get; set; } = [];
    /// <summary>Total bytes of the weight files, when known (local folders).</summary>
    public long? WeightsBytes { get; set; }
    /// <summary>"api" (registered over the admin endpoint) or "config" (seeded from the Models configuration).</summary>
    public string Source { get; set; } = FromApi;
    public DateTimeOffset CreatedAt { get; init; } = Jobs.Clock.Now();

    /// <summary>Fills the shape fields from a config.json.</summary>
    public void SetShapes(ModelConfig c)
    {
        Architecture = c.Architectures.FirstOrDefault(a => ModelConfig.SupportedArchitectures.Contains(a)) ?? c.Architectures.FirstOrDefault() ?? "";
        ModelType = c.ModelType;
        HiddenSize = c.HiddenSize;
        NumLayers = c.NumHiddenLayers;
        VocabSize = c.VocabSize;
        IntermediateSize = c.IntermediateSize;
        NumAttentionHeads = c.NumAttentionHeads;
        NumKeyValueHeads = c.KvHeads;
        Modules = [.. c.LayerLinears()];
    }

    /// <summary>How a config.json differs from the registered shapes (empty when it matches).</summary>
    public IEnumerable<string> Differences(ModelConfig c)
    {
        if (c.HiddenSize != HiddenSize) yield return $"hidden_size {c.HiddenSize} (registered {HiddenSize})";
        if (c.NumHiddenLayers != NumLayers) yield return $"num_hidden_layers {c.NumHiddenLayers} (registered {NumLayers})";
        if (c.VocabSize != VocabSize) yield return $"vocab_size {c.VocabSize} (registered {VocabSize})";
        var now = c.LayerLinears();
        if (!now.SequenceEqual(Modules)) yield return "module shapes";
    }
}
