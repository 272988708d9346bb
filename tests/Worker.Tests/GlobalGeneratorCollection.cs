namespace FineTune.Worker.Tests;

/// <summary>Test classes that seed or draw from libtorch's process-wide generator (ManualSeed, dropout, Randn without a
/// Generator) run one after another: the trainer's resume tests replay dropout masks and would see another class's draws.</summary>
[CollectionDefinition(Name)]
public sealed class GlobalGeneratorCollection
{
    public const string Name = "libtorch global generator";
}
