using FineTune.Api.Infrastructure;
using Microsoft.Extensions.Options;

namespace FineTune.Api.Submission;

/// <summary>
/// Submit-time check of a dataset reference: the one place that decides whether a file is acceptable. Errors are
/// strings shown under the request field ("line 3: …" once the JSONL reader checks content).
/// </summary>
public sealed class DatasetCheck(IOptions<StorageOptions> storage)
{
    public Task<IReadOnlyList<string>> CheckAsync(string reference, CancellationToken ct)
    {
        // The content check (formats, line-numbered errors, limits) plugs in here once DatasetReader is merged:
        // resolve with DatasetUri, then read a sample with DatasetReader and map its issues to "line N: …".
        IReadOnlyList<string> errors;
        var (path, error) = Paths.Confine(reference, storage.Value.EffectiveDataRoots);
        if (error is not null) errors = [error];
        else if (!File.Exists(path)) errors = ["file not found"];
        else if (new FileInfo(path!).Length == 0) errors = ["file is empty"];
        else errors = [];
        return Task.FromResult(errors);
    }
}
