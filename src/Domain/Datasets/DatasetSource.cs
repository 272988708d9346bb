using FineTune.Domain.Remote;

namespace FineTune.Domain.Datasets;

/// <summary>A dataset as a local file to read; a downloaded copy is deleted on dispose.</summary>
public sealed class LocalDataset(string path, bool temporary) : IDisposable
{
    public string Path { get; } = path;

    public void Dispose()
    {
        if (!temporary) return;
        try { File.Delete(Path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

/// <summary>
/// Opens a dataset reference the same way on the API and on the workers: <c>https://</c> (downloaded to a temporary
/// file with <see cref="RemoteFetcher"/>'s protections, capped at <c>Datasets:MaxBytes</c>), or a local file
/// (<c>file:///…</c>, an absolute path, or a path relative to the data roots) confined by <see cref="DatasetUri"/>.
/// A remote file whose path ends in <c>.txt</c> is plain text, like a local one.
/// </summary>
public sealed class DatasetSource(IReadOnlyList<string> dataRoots, RemoteFetcher fetcher, DatasetLimits limits)
{
    private readonly DatasetUri _local = new(dataRoots);

    /// <summary>Throws <see cref="DatasetUriException"/> or <see cref="RemoteFetchException"/> with a message for the user.</summary>
    public async Task<LocalDataset> OpenAsync(string reference, CancellationToken ct)
    {
        if (RemoteFetcher.IsRemote(reference))
        {
            var uri = fetcher.Parse(reference);
            var ext = uri.AbsolutePath.EndsWith(".txt", StringComparison.OrdinalIgnoreCase) ? ".txt" : ".jsonl";
            var temp = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"ft-dataset-{Guid.NewGuid():N}{ext}");
            var limitsOfFetch = new FetchLimits(limits.MaxBytes, "Datasets:MaxBytes", fetcher.Options.Timeout, "Remote:Timeout");
            await fetcher.DownloadAsync(uri, temp, limitsOfFetch, ct: ct);
            return new LocalDataset(temp, temporary: true);
        }
        return new LocalDataset(_local.Resolve(Anchor(reference)), temporary: false);
    }

    /// <summary>A relative path names a file under the first data root that has it.</summary>
    private string Anchor(string reference)
    {
        if (string.IsNullOrWhiteSpace(reference) || reference.Contains(':') || System.IO.Path.IsPathRooted(reference)) return reference;
        var roots = _local.AllowedRoots;
        return roots.Select(r => System.IO.Path.Combine(r, reference)).FirstOrDefault(File.Exists)
            ?? (roots.Count > 0 ? System.IO.Path.Combine(roots[0], reference) : reference);
    }
}
