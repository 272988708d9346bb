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
/// Plain text (no prompt): the whole text is the completion. Chat: rendered with the model's chat template
/// (<see cref="ChatTemplate"/>, from tokenizer_config.json; the configured default, ChatML, when the model has none),
/// loss on each assistant turn's content and its end-of-turn token (so the model learns to stop).
/// The text is tokenized whole, as <c>tokenizer(apply_chat_template(...))</c> would, so that tokens merging across a
/// turn boundary (SentencePiece's ▁ before an answer, a run of newlines) come out as the reference makes them; a
/// segment's first token is found by encoding the text up to it and comparing. Sequences are cut to
/// <c>maxSeqLength</c> tokens.
/// </summary>
public static class ExampleEncoder
{
    public static EncodedExample Encode(DatasetExample example, ITokenizer tokenizer, int maxSeqLength)
    {
        var ids = new List<int>();
        var labels = new List<int>();
        void AddId(int id, bool loss)
        {
            ids.Add(id);
            labels.Add(loss ? id : EncodedExample.Ignore);
        }

        if (example.Messages is { Count: > 0 } messages)
        {
            if (!messages.Any(m => m.Role == "assistant"))
                throw new DatasetEncodingException(example.Line, "a conversation needs at least one assistant message");
            var template = tokenizer.ChatTemplate ?? ChatTemplate.Named(ChatTemplate.ChatMl);
            IReadOnlyList<ChatSegment> segments;
            try
            {
                segments = template.Render(messages, Text(tokenizer, tokenizer.BosId), Text(tokenizer, tokenizer.EosId));
            }
            catch (ChatTemplateException e)
            {
                throw new DatasetEncodingException(example.Line, e.Message);
            }
            if (!template.FromModel && template.AddBos && tokenizer.BosId is { } bos) AddId(bos, loss: false);
            AddSegments(segments);
        }
        else
        {
            if (string.IsNullOrEmpty(example.Completion))
                throw new DatasetEncodingException(example.Line, "the completion (or text) is empty");
            if (tokenizer.BosId is { } bos) AddId(bos, loss: false);
            AddSegments([new ChatSegment(example.Prompt ?? "", false), new ChatSegment(example.Completion, true)]);
            if (tokenizer.EosId is { } eos) AddId(eos, loss: true);
        }

        var n = Math.Min(ids.Count, maxSeqLength);
        return new EncodedExample(example.Line, ids.Take(n).ToArray(), labels.Take(n).ToArray());

        void AddSegments(IReadOnlyList<ChatSegment> segments)
        {
            var text = string.Concat(segments.Select(s => s.Text));
            var whole = tokenizer.Encode(text);
            // Usually (byte-level BPE, turns that start after special tokens or newlines) the segments tokenize to the
            // same ids one by one; then each id's loss is its segment's.
            var parts = segments.Select(s => tokenizer.Encode(s.Text)).ToList();
            if (parts.Sum(p => p.Length) == whole.Length && parts.SelectMany(p => p).SequenceEqual(whole))
            {
                for (var i = 0; i < parts.Count; i++)
                    foreach (var id in parts[i]) AddId(id, segments[i].Loss);
                return;
            }
            // Otherwise (SentencePiece's ▁ before an answer, merges across a boundary) find the first token of each
            // segment whose loss differs from the one before by encoding the text up to it; a token straddling the
            // boundary goes to the later segment.
            var starts = new List<(int Token, bool Loss)>();
            var offset = 0;
            bool? previous = null;
            foreach (var s in segments)
            {
                if (s.Loss != previous)
                    starts.Add((offset == 0 ? 0 : CommonPrefix(tokenizer.Encode(text[..offset]), whole), s.Loss));
                previous = s.Loss;
                offset += s.Text.Length;
            }
            var next = 0;
            var loss = false;
            for (var i = 0; i < whole.Length; i++)
            {
                while (next < starts.Count && starts[next].Token <= i) loss = starts[next++].Loss;
                AddId(whole[i], loss);
            }
        }
    }

    private static int CommonPrefix(int[] a, int[] b)
    {
        var n = Math.Min(a.Length, b.Length);
        var i = 0;
        while (i < n && a[i] == b[i]) i++;
        return i;
    }

    private static string? Text(ITokenizer tokenizer, int? id) => id is { } i ? tokenizer.IdToToken(i) : null;
}
