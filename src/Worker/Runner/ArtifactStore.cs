using System.Security.Cryptography;

namespace FineTune.Worker.Runner;

/// <summary>
/// Files of jobs and adapters under one root (local disk by default; a shared volume across nodes in a cluster):
/// <c>adapters/&lt;tenant&gt;/&lt;task&gt;/v&lt;version&gt;/</c>, <c>checkpoints/&lt;job&gt;/step-N.safetensors</c>, and
/// <c>staging/&lt;job&gt;-&lt;generation&gt;/</c> where a run writes its adapter before it is registered.
/// </summary>
public sealed class ArtifactStore(string root)
{
    public string Root { get; } = Path.GetFullPath(root);

    public string CheckpointDir(Guid jobId) => Path.Combine(Root, "checkpoints", jobId.ToString("n"));

    public string StagingDir(Guid jobId, long generation) => Path.Combine(Root, "staging", $"{jobId:n}-{generation}");

    public string AdapterDir(Guid tenantId, string task, int version) =>
        Path.Combine(Root, "adapters", tenantId.ToString("n"), task, $"v{version}");

    /// <summary>Moves a finished staging folder into its registry place (same file system: one rename).</summary>
    public string Publish(string stagingDir, Guid tenantId, string task, int version)
    {
        var target = AdapterDir(tenantId, task, version);
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        if (Directory.Exists(target)) Directory.Delete(target, recursive: true); // a half-published earlier attempt
        Directory.Move(stagingDir, target);
        return target;
    }

    /// <summary>Every file below a folder with its size and sha256, paths relative and '/'-separated.</summary>
    public static List<ArtifactFile> Describe(string dir) =>
        Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories)
            .Order(StringComparer.Ordinal)
            .Select(f => new ArtifactFile(Path.GetRelativePath(dir, f).Replace('\\', '/'), new FileInfo(f).Length, Sha256Of(f)))
            .ToList();

    public static string Sha256Of(string file)
    {
        using var stream = File.OpenRead(file);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    /// <summary>Deletes all but the newest <paramref name="keep"/> checkpoints of a job.</summary>
    public void PruneCheckpoints(Guid jobId, int keep)
    {
        var dir = CheckpointDir(jobId);
        if (!Directory.Exists(dir)) return;
        foreach (var old in Directory.GetFiles(dir, "step-*.safetensors")
                     .OrderByDescending(f => StepOf(f)).Skip(Math.Max(1, keep)))
            File.Delete(old);
    }

    public static long StepOf(string checkpointFile) =>
        long.TryParse(Path.GetFileNameWithoutExtension(checkpointFile).AsSpan("step-".Length), out var s) ? s : -1;
}

public sealed record ArtifactFile(string Path, long Size, string Sha256);
