// The reader's optional CancellationToken is irrelevant for these small files.
#pragma warning disable xUnit1051
using System.Security.Cryptography;
using System.Text;
using FineTune.Domain.Datasets;

namespace FineTune.Api.Tests.Datasets;

public sealed class DatasetReaderTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ds-reader-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string content, string name = "data.jsonl")
    {
        var path = Path.Combine(_dir, name);
        File.WriteAllText(path, content, new UTF8Encoding(false));
        return path;
    }

    [Fact]
    public void Chat_format_is_detected_and_read()
    {
        var path = Write("""
            {"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}

            {"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"}],"extra":1}
            """);
        var r = DatasetReader.Read(path);
        Assert.Equal(DatasetFormat.Chat, r.Format);
        Assert.Empty(r.Errors);
        Assert.True(r.IsValid);
        Assert.Equal(2, r.ExampleCount);
        Assert.Equal([1, 3], r.Examples.Select(e => e.Line));
        var first = r.Examples[0].Messages!;
        Assert.Equal(["system", "user", "assistant"], first.Select(m => m.Role));
        Assert.Equal("Hello!", first[2].Content);
        Assert.Null(r.Examples[0].Prompt);
    }

    [Fact]
    public void Prompt_completion_is_read()
    {
        var path = Write("{\"prompt\":\"Q: 1+1\\nA:\",\"completion\":\" 2\"}\r\n{\"prompt\":\"p\",\"completion\":\"c\"}\r\n");
        var r = DatasetReader.Read(path);
        Assert.Equal(DatasetFormat.PromptCompletion, r.Format);
        Assert.Equal(0, r.ErrorCount);
        Assert.Equal(new DatasetExample(1, "Q: 1+1\nA:", " 2"), r.Examples[0]);
        Assert.Equal(new DatasetExample(2, "p", "c"), r.Examples[1]);
    }

    [Fact]
    public void Alpaca_builds_the_standard_prompts()
    {
        var path = Write("""
            {"instruction":"Add the numbers.","input":"2 and 3","output":"5"}
            {"instruction":"Say hi.","input":"","output":"hi"}
            {"instruction":"Say bye.","output":"bye"}
            """);
        var r = DatasetReader.Read(path);
        Assert.Equal(DatasetFormat.Alpaca, r.Format);
        Assert.Equal(0, r.ErrorCount);
        Assert.Equal(
            "Below is an instruction that describes a task, paired with an input that provides further context. " +
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n" +
            "### Input:\n2 and 3\n\n### Response:\n", r.Examples[0].Prompt);
        Assert.Equal("5", r.Examples[0].Completion);
        const string noInput = "Below is an instruction that describes a task. Write a response that appropriately " +
                               "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
        Assert.Equal(noInput, r.Examples[1].Prompt);
        Assert.Equal(noInput.Replace("Say hi.", "Say bye."), r.Examples[2].Prompt);
    }

    [Fact]
    public void Text_jsonl_is_read_as_completion_only()
    {
        var r = DatasetReader.Read(Write("{\"text\":\"The cat sat.\"}\n{\"text\":\"  spaces kept  \"}"));
        Assert.Equal(DatasetFormat.Text, r.Format);
        Assert.Equal([new DatasetExample(1, null, "The cat sat."), new DatasetExample(2, null, "  spaces kept  ")], r.Examples);
    }

    [Fact]
    public void Txt_file_has_one_example_per_non_empty_line()
    {
        var r = DatasetReader.Read(Write("first line\n\n  \nsecond {not json}\r\nthird 😀 漢字", "corpus.txt"));
        Assert.Equal(DatasetFormat.Text, r.Format);
        Assert.Equal(0, r.ErrorCount);
        Assert.Equal([1, 4, 5], r.Examples.Select(e => e.Line));
        Assert.Equal(["first line", "second {not json}", "third 😀 漢字"], r.Examples.Select(e => e.Completion));
    }

    [Fact]
    public void Txt_file_cannot_be_declared_as_another_format()
    {
        var path = Write("hello", "a.txt");
        Assert.Throws<DatasetException>(() => DatasetReader.Read(path, DatasetFormat.Chat));
    }

    [Fact]
    public void Utf8_bom_is_ignored()
    {
        var path = Path.Combine(_dir, "bom.jsonl");
        File.WriteAllText(path, "{\"text\":\"x\"}\n", new UTF8Encoding(true));
        var r = DatasetReader.Read(path);
        Assert.Equal(0, r.ErrorCount);
        Assert.Single(r.Examples);
    }

    [Fact]
    public void Invalid_json_reports_line_and_reader_message()
    {
        var r = DatasetReader.Read(Write("{\"text\":\"ok\"}\n{\"text\": oops}\n{\"text\":\"ok\"}\n"));
        Assert.Equal(1, r.ErrorCount);
        var issue = Assert.Single(r.Errors);
        Assert.Equal(2, issue.Line);
        Assert.StartsWith("invalid JSON: ", issue.Message);
        Assert.Contains("'o' is an invalid start of a value", issue.Message);
        Assert.Contains("(at byte 9)", issue.Message);
        Assert.Equal(2, r.ExampleCount);
    }

    [Theory]
    [InlineData("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", "\"messages\" has no assistant message")]
    [InlineData("{\"messages\":[{\"role\":\"bot\",\"content\":\"hi\"}]}", "messages[0].role \"bot\" is not one of system, user, assistant")]
    [InlineData("{\"messages\":[{\"role\":\"assistant\",\"content\":\"\"}]}", "messages[0].content is an empty string")]
    [InlineData("{\"messages\":[{\"role\":\"assistant\",\"content\":null}]}", "messages[0].content must be a string, got null")]
    [InlineData("{\"messages\":[{\"role\":\"assistant\"}]}", "missing field messages[0].content")]
    [InlineData("{\"messages\":[{\"role\":1,\"content\":\"x\"}]}", "messages[0].role must be a string, got a number")]
    [InlineData("{\"messages\":[\"hi\"]}", "messages[0] must be an object, got a string")]
    [InlineData("{\"messages\":{}}", "\"messages\" must be an array, got an object")]
    [InlineData("{\"messages\":[]}", "\"messages\" is empty")]
    [InlineData("{\"prompt\":\"p\"}", "line is in prompt/completion format but the file is chat (messages) (detected from line 1)")]
    [InlineData("{\"foo\":1}", "missing field \"messages\"")]
    [InlineData("[1,2]", "expected a JSON object, got an array")]
    public void Chat_line_errors(string badLine, string message)
    {
        var good = "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}";
        var r = DatasetReader.Read(Write($"{good}\n{good}\n{badLine}\n{good}"));
        Assert.Equal(DatasetFormat.Chat, r.Format);
        Assert.Equal(new DatasetIssue(3, message), Assert.Single(r.Errors));
        Assert.Equal(3, r.ExampleCount);
        Assert.False(r.IsValid);
    }

    [Theory]
    [InlineData("{\"prompt\":\"\",\"completion\":\"c\"}", "\"prompt\" is an empty string")]
    [InlineData("{\"prompt\":\"p\"}", "missing field \"completion\"")]
    [InlineData("{\"prompt\":\"p\",\"completion\":5}", "\"completion\" must be a string, got a number")]
    [InlineData("{\"text\":\"t\"}", "line is in text format but the file is prompt/completion (detected from line 1)")]
    public void Prompt_completion_line_errors(string badLine, string message)
    {
        var r = DatasetReader.Read(Write($"{{\"prompt\":\"p\",\"completion\":\"c\"}}\n{badLine}\n"));
        Assert.Equal(new DatasetIssue(2, message), Assert.Single(r.Errors));
    }

    [Theory]
    [InlineData("{\"instruction\":\"i\"}", "missing field \"output\"")]
    [InlineData("{\"instruction\":\"i\",\"input\":3,\"output\":\"o\"}", "\"input\" must be a string, got a number")]
    [InlineData("{\"output\":\"o\"}", "missing field \"instruction\"")]
    [InlineData("{\"instruction\":\"i\",\"output\":\"\"}", "\"output\" is an empty string")]
    public void Alpaca_line_errors(string badLine, string message)
    {
        var r = DatasetReader.Read(Write($"{{\"instruction\":\"i\",\"output\":\"o\"}}\n{badLine}\n"));
        Assert.Equal(new DatasetIssue(2, message), Assert.Single(r.Errors));
    }

    [Fact]
    public void Declared_format_is_enforced_from_the_first_line()
    {
        var r = DatasetReader.Read(Write("{\"text\":\"t\"}\n{\"prompt\":\"p\",\"completion\":\"c\"}"), DatasetFormat.PromptCompletion);
        Assert.Equal(DatasetFormat.PromptCompletion, r.Format);
        Assert.Equal(new DatasetIssue(1, "line is in text format but the file is prompt/completion (as declared)"),
            Assert.Single(r.Errors));
        Assert.Equal(1, r.ExampleCount);
    }

    [Fact]
    public void Unrecognised_lines_before_detection_are_errors_and_detection_uses_the_first_recognised_line()
    {
        var r = DatasetReader.Read(Write("{\"foo\":1}\nnot json\n{\"text\":\"t\"}\n{\"text\":\"u\"}"));
        Assert.Equal(DatasetFormat.Text, r.Format);
        Assert.Equal([1, 2], r.Errors.Select(e => e.Line));
        Assert.StartsWith("unrecognised format", r.Errors[0].Message);
        Assert.Equal(2, r.ExampleCount);
    }

    [Fact]
    public void Invalid_utf8_is_reported()
    {
        var path = Path.Combine(_dir, "bad.txt");
        File.WriteAllBytes(path, [.. "ok\n"u8, 0xC3, 0x28, (byte)'\n']);
        var r = DatasetReader.Read(path);
        Assert.Equal(new DatasetIssue(2, "line is not valid UTF-8"), Assert.Single(r.Errors));

        var jsonPath = Path.Combine(_dir, "bad.jsonl");
        File.WriteAllBytes(jsonPath, [.. "{\"text\":\""u8, 0xFF, .. "\"}"u8]);
        var j = DatasetReader.Read(jsonPath);
        Assert.Equal(new DatasetIssue(1, "line is not valid UTF-8"), Assert.Single(j.Errors));
    }

    [Fact]
    public void Errors_are_capped_but_counted()
    {
        var lines = Enumerable.Range(0, 50).Select(i => i % 2 == 0 ? "{\"text\":\"ok\"}" : "{bad");
        var r = DatasetReader.Read(Write(string.Join("\n", lines)), limits: new DatasetLimits(MaxErrors: 5));
        Assert.Equal(25, r.ErrorCount);
        Assert.Equal([2, 4, 6, 8, 10], r.Errors.Select(e => e.Line));
        Assert.Equal(25, r.ExampleCount);
    }

    [Fact]
    public void Default_error_cap_is_20()
    {
        var r = DatasetReader.Read(Write(string.Concat(Enumerable.Repeat("x\n", 30))));
        Assert.Equal(30, r.ErrorCount);
        Assert.Equal(20, r.Errors.Count);
    }

    [Fact]
    public void Overlong_line_is_reported_and_reading_goes_on()
    {
        var longText = new string('a', 300);
        var content = $"{{\"text\":\"short\"}}\n{{\"text\":\"{longText}\"}}\n{{\"text\":\"after\"}}\n";
        var r = DatasetReader.Read(Write(content), limits: new DatasetLimits(MaxLineBytes: 100));
        Assert.Equal(new DatasetIssue(2, "line is longer than 100 bytes (Datasets:MaxLineBytes)"), Assert.Single(r.Errors));
        Assert.Equal(["short", "after"], r.Examples.Select(e => e.Completion));
    }

    [Fact]
    public void Overlong_line_spanning_read_buffers_is_skipped_whole()
    {
        // Longer than the 64 KiB read buffer, so the line is cut across several reads.
        var content = "{\"text\":\"" + new string('b', 200_000) + "\"}\n{\"text\":\"z\"}";
        var r = DatasetReader.Read(Write(content), limits: new DatasetLimits(MaxLineBytes: 1000));
        Assert.Equal(1, Assert.Single(r.Errors).Line);
        Assert.Equal(new DatasetExample(2, null, "z"), Assert.Single(r.Examples));
    }

    [Fact]
    public void Line_of_exactly_the_limit_is_accepted_with_crlf()
    {
        var line = "{\"text\":\"" + new string('c', 89) + "\"}"; // 100 bytes
        var r = DatasetReader.Read(Write(line + "\r\n" + line), limits: new DatasetLimits(MaxLineBytes: 100));
        Assert.Equal(0, r.ErrorCount);
        Assert.Equal(2, r.ExampleCount);
    }

    [Fact]
    public void File_over_max_bytes_is_refused_before_reading()
    {
        var path = Write(string.Concat(Enumerable.Repeat("{\"text\":\"t\"}\n", 10)));
        var e = Assert.Throws<DatasetException>(() => DatasetReader.Read(path, limits: new DatasetLimits(MaxBytes: 50)));
        Assert.Contains("over the limit of 50 bytes", e.Message);
    }

    [Fact]
    public void Stream_over_max_bytes_is_refused_while_reading()
    {
        using var s = new MemoryStream(Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat("{\"text\":\"t\"}\n", 10))));
        Assert.Throws<DatasetException>(() => DatasetReader.Read(s, plainText: false, limits: new DatasetLimits(MaxBytes: 50)));
    }

    [Fact]
    public void Max_examples_stops_with_an_error()
    {
        var r = DatasetReader.Read(Write(string.Concat(Enumerable.Repeat("{\"text\":\"t\"}\n", 5))),
            limits: new DatasetLimits(MaxExamples: 3));
        Assert.Equal(3, r.ExampleCount);
        Assert.Equal(new DatasetIssue(4, "the dataset has more than 3 examples (Datasets:MaxExamples)"), Assert.Single(r.Errors));
    }

    [Fact]
    public void Missing_file_throws()
    {
        Assert.Throws<DatasetException>(() => DatasetReader.Read(Path.Combine(_dir, "nope.jsonl")));
    }

    [Fact]
    public void Empty_file_is_an_error_for_the_whole_file()
    {
        var r = DatasetReader.Read(Write("\n\n"));
        Assert.Equal(new DatasetIssue(0, "the dataset contains no examples"), Assert.Single(r.Errors));
        Assert.Equal(DatasetFormat.Auto, r.Format);
    }

    [Fact]
    public void Sha256_and_bytes_cover_the_whole_file()
    {
        // Bigger than one read buffer and ending without a newline.
        var content = string.Concat(Enumerable.Range(0, 5000).Select(i => $"{{\"text\":\"line {i} ü\"}}\n")) + "{\"text\":\"end\"}";
        var path = Write(content);
        var bytes = File.ReadAllBytes(path);
        var r = DatasetReader.Read(path);
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes)), r.Sha256);
        Assert.Equal(bytes.Length, r.Bytes);
        Assert.Equal(5001, r.ExampleCount);
        Assert.Equal(5001, r.Examples[^1].Line);
        Assert.Equal("line 4999 ü", r.Examples[^2].Completion);
    }

    [Fact]
    public void Validate_counts_without_keeping_examples()
    {
        var path = Write("{\"text\":\"a\"}\n{\"text\":\"b\"}\n{\"text\":3}\n");
        var r = DatasetReader.Validate(path);
        Assert.Empty(r.Examples);
        Assert.Equal(2, r.ExampleCount);
        Assert.Equal(new DatasetIssue(3, "\"text\" must be a string, got a number"), Assert.Single(r.Errors));
        Assert.Equal(DatasetReader.Read(path).Sha256, r.Sha256);
    }
}
