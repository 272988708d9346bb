using FineTune.Domain.Datasets;
using FineTune.Domain.Jobs;
using FineTune.Domain.Remote;
using FineTune.Domain.Tokenizers;

namespace FineTune.Api.Submission;

/// <summary>
/// Submit-time check of a dataset reference: opens it (a local file under the data roots, or an https:// download),
/// reads every line, tokenizes every example with the model's tokenizer and applies the truncation policy. Errors are
/// strings shown under the request field ("line 3: …"), and the same problems with their line numbers as data.
/// </summary>
public sealed class DatasetCheck(DatasetSource source, DatasetOptions options)
{
    /// <summary>The line problems of one dataset as the problem's <c>datasetErrors</c> extension carries them.</summary>
    public sealed record LineErrors(int Total, IReadOnlyList<LineError> Errors);
    public sealed record LineError(int Line, string Message);

    public sealed record Outcome(DatasetSummary? Summary, IReadOnlyList<string> Errors, LineErrors? Lines);

    public async Task<Outcome> CheckAsync(string reference, ITokenizer? tokenizer, int? vocabSize, Hyperparameters hp, CancellationToken ct)
    {
        LocalDataset file;
        try
        {
            file = await source.OpenAsync(reference, ct);
        }
        catch (Exception e) when (e is DatasetUriException or RemoteFetchException)
        {
            return new Outcome(null, [e.Message], null);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new Outcome(null, [$"the dataset cannot be read on this server: {e.Message}"], null);
        }
        using (file)
        {
            DatasetProfileResult r;
            try
            {
                // Tokenizing a large file is CPU work: off the request thread's synchronous path.
                r = await Task.Run(() => DatasetProfile.Read(file.Path, tokenizer, hp.MaxSeqLength, hp.Truncation, options.Limits, vocabSize, ct), ct);
            }
            catch (Exception e) when (e is DatasetException or IOException or UnauthorizedAccessException)
            {
                return new Outcome(null, [e.Message], null);
            }
            if (r.ErrorCount == 0) return new Outcome(r.Summary, [], null);
            var errors = r.Errors.Select(i => i.Line > 0 ? i.ToString() : i.Message).ToList();
            if (r.ErrorCount > r.Errors.Count)
                errors.Add($"{r.ErrorCount} problems in total; the first {r.Errors.Count} are listed (Datasets:MaxErrors)");
            return new Outcome(r.Summary, errors, new LineErrors(r.ErrorCount, [.. r.Errors.Select(i => new LineError(i.Line, i.Message))]));
        }
    }
}
