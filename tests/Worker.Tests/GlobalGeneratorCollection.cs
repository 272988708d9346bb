namespace FineTune.Worker.Tests;

/// <summary>Test classes that seed or draw from libtorch's process-wide generator (ManualSeed, Randn without a Generator)
/// run one after another, so that a test asserting on such draws never sees another class's. The trainer itself no
/// longer draws from it (dropout masks are seeded per call: ConcurrentJobsTests).</summary>
[CollectionDefinition(Name)]
public sealed class GlobalGeneratorCollection
{
    public const string Name = "libtorch global generator";
}
