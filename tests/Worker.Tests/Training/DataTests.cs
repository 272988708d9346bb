using FineTune.Domain.Datasets;
using FineTune.Worker.Training.Data;

namespace FineTune.Worker.Tests.Training;

public sealed class DataTests
{
    private static readonly ByteTokenizer Tok = new();
    private const int I = EncodedExample.Ignore;

    [Fact]
    public void Prompt_completion_gets_bos_eos_and_loss_on_completion_only()
    {
        var e = ExampleEncoder.Encode(new DatasetExample(3, "ab", "cd"), Tok, 512);
        Assert.Equal([256, 'a', 'b', 'c', 'd', 257], e.Ids);
        Assert.Equal([I, I, I, 'c', 'd', 257], e.Labels);
        Assert.Equal(3, e.LossTokens);
    }

    [Fact]
    public void Plain_text_is_all_completion()
    {
        var e = ExampleEncoder.Encode(new DatasetExample(1, null, "hi"), Tok, 512);
        Assert.Equal([256, 'h', 'i', 257], e.Ids);
        Assert.Equal([I, 'h', 'i', 257], e.Labels);
    }

    [Fact]
    public void Chat_is_chatml_with_loss_on_assistant_turns()
    {
        var e = ExampleEncoder.Encode(new DatasetExample(1, null, null,
            [new ChatMessage("user", "q"), new ChatMessage("assistant", "A")]), Tok, 512);
        var text = Tok.Decode(e.Ids);
        Assert.Equal("<|begin_of_text|><|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n", text);
        var learned = Tok.Decode(e.Labels.Where(l => l != I).ToArray());
        Assert.Equal("A<|im_end|>", learned);
        Assert.Throws<DatasetEncodingException>(() => ExampleEncoder.Encode(
            new DatasetExample(9, null, null, [new ChatMessage("user", "q")]), Tok, 512));
    }

    [Fact]
    public void Truncation_and_empty_examples()
    {
        var e = ExampleEncoder.Encode(new DatasetExample(1, "abcdef", "gh"), Tok, 8);
        Assert.Equal(8, e.Ids.Length);
        Assert.Equal(1, e.LossTokens);
        var gone = TrainingData.Encode([new DatasetExample(1, "abcdefghij", "k"), new DatasetExample(2, "a", "b")], Tok, 8, out var skipped);
        Assert.Single(gone);
        Assert.Equal(1, skipped);
        var ex = Assert.Throws<DatasetEncodingException>(() => ExampleEncoder.Encode(new DatasetExample(7, "p", ""), Tok, 8));
        Assert.Equal(7, ex.Line);
    }

    [Fact]
    public void Shuffles_are_seeded_permutations_and_batches_run_across_epochs()
    {
        var data = TrainingData.Build(TestData.TextSet(10), Tok, 64, batchSize: 4, seed: 5);
        var o0 = data.Order(0);
        Assert.Equal(Enumerable.Range(0, 10), o0.Order());
        Assert.NotEqual(o0, data.Order(1));
        Assert.Equal(o0, TrainingData.Build(TestData.TextSet(10), Tok, 64, 4, 5).Order(0));
        Assert.NotEqual(o0, TrainingData.Build(TestData.TextSet(10), Tok, 64, 4, 6).Order(0));

        var pos = new DataPosition(0, 0);
        var seen = new List<int>();
        for (var i = 0; i < 5; i++) seen.AddRange(data.Next(ref pos).Select(e => e.Line));
        Assert.Equal(new DataPosition(2, 0), pos);
        Assert.Equal(o0.Select(i => i + 1), seen.Take(10));
        Assert.Equal(data.Order(1).Select(i => i + 1), seen.Skip(10));

        // Resuming from a stored position continues the same stream.
        var resumed = new DataPosition(0, 8);
        Assert.Equal(seen.Skip(8).Take(4), data.Next(ref resumed).Select(e => e.Line));
    }

    [Fact]
    public void Collate_right_pads_with_pad_id_and_ignored_labels()
    {
        var a = new EncodedExample(1, [256, 1, 2, 257], [I, 1, 2, 257]);
        var b = new EncodedExample(2, [256, 5], [I, 5]);
        var batch = TrainingData.Collate([a, b], 258);
        Assert.Equal((2, 4), (batch.Rows, batch.Length));
        Assert.Equal([256, 1, 2, 257, 256, 5, 258, 258], batch.Ids);
        Assert.Equal([I, 1, 2, 257, I, 5, I, I], batch.Labels);
        Assert.Equal(6, batch.Tokens);
        Assert.Equal(4, batch.LossTokens);
    }
}
