using FineTune.Domain.Tokenizers;

namespace FineTune.Domain.Datasets;

/// <summary>One example as token ids, with labels aligned to the ids (the model shifts them): -100 where no loss is taken.</summary>
public sealed record EncodedExample(int Line, int[] Ids, int[] Labels)
{
    public const int Ignore = -100;
    /// <summary>Tokens that are predicted (labels after the one-position shift that are not -100).</summary>
    public int LossTokens { get; } = Labels.Skip(1).Count(l => l != Ignore);
}

/// <summary>A dataset line that cannot become training tokens; the job fails with its line number.</summary>
public sealed class DatasetEncodingException(int line, string message) : Exception($"line {line}: {message}")
{
    public int Line { get; } = line;
}

/// <summary>
/// Turns examples into ids and labels. Prompt/completion: [BOS] prompt completion [EOS], loss on completion and EOS.
/// Plain text (no prompt): the whole text is the completion. Chat: ChatML text
/// (<c>&lt;|im_start|&gt;role\ncontent&lt;|im_end|&gt;\n</c>) with loss on each assistant turn's content and its
/// closing <c>&lt;|im_end|&gt;</c> (so the model learns to stop). Sequences are cut to <c>maxSeqLength</c> tokens.
/// </summary>
public static class ExampleEncoder
{
    public static EncodedExample Encode(DatasetExample example, ITokenizer tokenizer, int maxSeqLength)
    {
        var ids = new List<int>();
        var labels = new List<int>();
        void Add(string text, bool loss)
        {
            if (text.Length == 0) return;
            foreach (var id in tokenizer.Encode(text))
            {
                ids.Add(id);
                labels.Add(loss ? id : EncodedExample.Ignore);
            }
        }
        void AddId(int id, bool loss)
        {
            ids.Add(id);
            labels.Add(loss ? id : EncodedExample.Ignore);
        }

        if (tokenizer.BosId is { } bos) AddId(bos, loss: false);
        if (example.Messages is { Count: > 0 } messages)
        {
            if (!messages.Any(m => m.Role == "assistant"))
                throw new DatasetEncodingException(example.Line, "a conversation needs at least one assistant message");
            foreach (var m in messages)
            {
                var assistant = m.Role == "assistant";
                Add($"<|im_start|>{m.Role}\n", loss: false);
                Add(m.Content, assistant);
                Add("<|im_end|>", assistant);
                Add("\n", loss: false);
            }
        }
        else
        {
            if (string.IsNullOrEmpty(example.Completion))
                throw new DatasetEncodingException(example.Line, "the completion (or text) is empty");
            Add(example.Prompt ?? "", loss: false);
            Add(example.Completion, loss: true);
            if (tokenizer.EosId is { } eos) AddId(eos, loss: true);
        }

        var n = Math.Min(ids.Count, maxSeqLength);
        return new EncodedExample(example.Line, ids.Take(n).ToArray(), labels.Take(n).ToArray());
    }
}
