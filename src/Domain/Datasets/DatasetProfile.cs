using FineTune.Domain.Tokenizers;

namespace FineTune.Domain.Datasets;

/// <summary>What happens to an example longer than maxSeqLength (hyperparameters.truncation).</summary>
public static class Truncation
{
    public const string Truncate = "truncate", Reject = "reject";
    public static readonly string[] All = [Truncate, Reject];

    /// <summary>Encodes the whole example, then cuts it to <paramref name="maxSeqLength"/> tokens (truncate) or
    /// refuses it with its line number (reject).</summary>
    public static (EncodedExample Example, bool Truncated) Fit(DatasetExample example, ITokenizer tokenizer, int maxSeqLength, string policy)
    {
        var full = ExampleEncoder.Encode(example, tokenizer, int.MaxValue);
        if (full.Ids.Length <= maxSeqLength) return (full, false);
        if (policy == Reject)
            throw new DatasetEncodingException(example.Line,
                $"the example has {full.Ids.Length} tokens, more than maxSeqLength={maxSeqLength} (hyperparameters.truncation is \"reject\")");
        return (new EncodedExample(example.Line, full.Ids[..maxSeqLength], full.Labels[..maxSeqLength]), true);
    }
}

/// <summary>A dataset's counts after tokenization, as recorded on the job.</summary>
/// <param name="Examples">Examples that will be trained on.</param>
/// <param name="Tokens">Their tokens after truncation.</param>
/// <param name="Truncated">Examples cut to maxSeqLength (including skipped ones).</param>
/// <param name="Skipped">Examples left with nothing to learn once cut (the worker leaves them out).</param>
public sealed record DatasetSummary(DatasetFormat Format, int Examples, long Tokens, int Truncated, int Skipped, string Sha256, long Bytes);

/// <param name="Errors">The first MaxErrors problems of the file in line order (reading and tokenizing together).</param>
/// <param name="ErrorCount">Every problem found.</param>
public sealed record DatasetProfileResult(DatasetSummary Summary, IReadOnlyList<DatasetIssue> Errors, int ErrorCount);

/// <summary>
/// The submit-time check of a dataset: reads it once (streaming: nothing but counts is kept), tokenizes every example
/// with the model's tokenizer as the worker will, applies the truncation policy, and collects line-numbered errors.
/// Without a tokenizer (the model reference was bad) only the lines are checked.
/// </summary>
public static class DatasetProfile
{
    /// <param name="vocabSize">The model's vocab_size: a token id at or above it is an error of its line (the
    /// tokenizer does not belong to the model).</param>
    public static DatasetProfileResult Read(string path, ITokenizer? tokenizer, int maxSeqLength, string truncation,
        DatasetLimits limits, int? vocabSize = null, CancellationToken ct = default)
    {
        int examples = 0, truncated = 0, skipped = 0, encodingErrors = 0;
        long tokens = 0;
        var encodingIssues = new List<DatasetIssue>();
        void OnExample(DatasetExample e)
        {
            if (tokenizer is null) { examples++; return; }
            try
            {
                var (x, cut) = Truncation.Fit(e, tokenizer, maxSeqLength, truncation);
                if (vocabSize is { } v && Array.FindIndex(x.Ids, id => id < 0 || id >= v) is var at and >= 0)
                    throw new DatasetEncodingException(e.Line, $"token id {x.Ids[at]} is outside the model's vocabulary ({v}); tokenizer and model do not match");
                if (cut) truncated++;
                if (x.LossTokens == 0) { skipped++; return; }
                examples++;
                tokens += x.Ids.Length;
            }
            catch (Exception ex) when (ex is DatasetEncodingException or TokenizerException)
            {
                encodingErrors++;
                if (encodingIssues.Count < limits.MaxErrors)
                    encodingIssues.Add(new DatasetIssue(e.Line, ex is DatasetEncodingException d ? d.Message[$"line {d.Line}: ".Length..] : ex.Message));
            }
        }
        var read = DatasetReader.Read(path, DatasetFormat.Auto, limits, keepExamples: false, ct, OnExample);
        var errors = read.Errors.Concat(encodingIssues).OrderBy(i => i.Line).Take(limits.MaxErrors).ToList();
        var count = read.ErrorCount + encodingErrors;
        if (count == 0 && tokenizer is not null && examples == 0)
        {
            errors.Add(new DatasetIssue(0, $"no example has a token to learn within maxSeqLength={maxSeqLength}"));
            count = 1;
        }
        return new DatasetProfileResult(new DatasetSummary(read.Format, examples, tokens, truncated, skipped, read.Sha256, read.Bytes), errors, count);
    }
}
