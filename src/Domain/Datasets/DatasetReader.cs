using System.Buffers;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace FineTune.Domain.Datasets;

public enum DatasetFormat { Auto, Chat, PromptCompletion, Alpaca, Text }

public sealed record DatasetLimits(
    long MaxBytes = 1L << 30,
    int MaxLineBytes = 1 << 20,
    int MaxExamples = 10_000_000,
    int MaxErrors = 20)
{
    public static DatasetLimits Default { get; } = new();
}

/// <param name="Format">The format used (detected or declared); Auto when no line could be recognised.</param>
/// <param name="Examples">Empty when read with keepExamples = false.</param>
/// <param name="Errors">The first MaxErrors problems; line 0 means the file as a whole.</param>
/// <param name="ErrorCount">All problems found, including those not kept in <paramref name="Errors"/>.</param>
/// <param name="ExampleCount">Valid examples found (also counted when examples are not kept).</param>
public sealed record DatasetReadResult(
    DatasetFormat Format,
    IReadOnlyList<DatasetExample> Examples,
    IReadOnlyList<DatasetIssue> Errors,
    int ErrorCount,
    string Sha256,
    long Bytes,
    int ExampleCount)
{
    public bool IsValid => ErrorCount == 0;
}

/// <summary>A dataset file that cannot be read at all (missing, too large, unreadable).</summary>
public sealed class DatasetException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Reads a dataset file line by line (JSONL, or plain text for <c>.txt</c>), streaming and hashing it as it goes.
/// <para>Formats (one per file; with <see cref="DatasetFormat.Auto"/> the first line that is a recognisable JSON object
/// decides): chat <c>{"messages":[{"role","content"}]}</c>, <c>{"prompt","completion"}</c>, Alpaca
/// <c>{"instruction","input"?,"output"}</c> and <c>{"text"}</c>.</para>
/// <para>A <c>.txt</c> file holds one example per non-empty line (lines of only whitespace are skipped); the line is
/// taken verbatim as the completion. One example per line keeps line numbers exact and memory bounded.</para>
/// </summary>
public static partial class DatasetReader
{
    public const string AlpacaPromptWithInput =
        "Below is an instruction that describes a task, paired with an input that provides further context. " +
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{0}\n\n### Input:\n{1}\n\n### Response:\n";

    public const string AlpacaPromptNoInput =
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" +
        "### Instruction:\n{0}\n\n### Response:\n";

    public static string AlpacaPrompt(string instruction, string? input) =>
        string.IsNullOrEmpty(input)
            ? string.Format(AlpacaPromptNoInput, instruction)
            : string.Format(AlpacaPromptWithInput, instruction, input);

    /// <summary>Reads and validates a file. Throws <see cref="DatasetException"/> if the file cannot be read at all.</summary>
    /// <param name="onExample">Called with each valid example as it is read (counting tokens without keeping them).</param>
    public static DatasetReadResult Read(string path, DatasetFormat format = DatasetFormat.Auto,
        DatasetLimits? limits = null, bool keepExamples = true, CancellationToken cancellationToken = default,
        Action<DatasetExample>? onExample = null)
    {
        limits ??= DatasetLimits.Default;
        var info = new FileInfo(path);
        if (!info.Exists)
            throw new DatasetException($"dataset file not found: {path}");
        if (info.Length > limits.MaxBytes)
            throw new DatasetException($"dataset file is {info.Length} bytes, over the limit of {limits.MaxBytes} bytes (Datasets:MaxBytes)");
        var plainText = info.Extension.Equals(".txt", StringComparison.OrdinalIgnoreCase);
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16,
                FileOptions.SequentialScan);
            return Read(stream, plainText, format, limits, keepExamples, cancellationToken, onExample);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new DatasetException($"dataset file cannot be read: {e.Message}", e);
        }
    }

    /// <summary>Counts examples and collects errors without keeping the examples (for large files at submit time).</summary>
    public static DatasetReadResult Validate(string path, DatasetFormat format = DatasetFormat.Auto,
        DatasetLimits? limits = null, CancellationToken cancellationToken = default) =>
        Read(path, format, limits, keepExamples: false, cancellationToken);

    /// <summary>Reads from a stream; <paramref name="plainText"/> selects the one-example-per-line text reading.</summary>
    public static DatasetReadResult Read(Stream stream, bool plainText, DatasetFormat format = DatasetFormat.Auto,
        DatasetLimits? limits = null, bool keepExamples = true, CancellationToken cancellationToken = default,
        Action<DatasetExample>? onExample = null)
    {
        limits ??= DatasetLimits.Default;
        if (plainText && format is not (DatasetFormat.Auto or DatasetFormat.Text))
            throw new DatasetException($"a .txt file is plain text; it cannot be read as {FormatName(format)}");

        var state = new ReadState(plainText ? DatasetFormat.Text : format, limits, keepExamples, onExample);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(1 << 16);
        var line = new ArrayBufferWriter<byte>(4096);
        long total = 0;
        var lineNo = 1;
        var lineTooLong = false;
        try
        {
            int read;
            while ((read = stream.Read(buffer, 0, buffer.Length)) > 0)
            {
                cancellationToken.ThrowIfCancellationRequested();
                total += read;
                if (total > limits.MaxBytes)
                    throw new DatasetException($"dataset is over the limit of {limits.MaxBytes} bytes (Datasets:MaxBytes)");
                hash.AppendData(buffer, 0, read);
                var chunk = buffer.AsSpan(0, read);
                while (!chunk.IsEmpty)
                {
                    var nl = chunk.IndexOf((byte)'\n');
                    var part = nl < 0 ? chunk : chunk[..nl];
                    if (!lineTooLong)
                    {
                        // The trailing '\r' of a CRLF line is allowed one byte beyond the limit.
                        if (line.WrittenCount + part.Length > limits.MaxLineBytes + 1)
                        {
                            lineTooLong = true;
                            line.Clear();
                        }
                        else line.Write(part);
                    }
                    if (nl < 0) break;
                    state.OnLine(lineNo++, line.WrittenSpan, lineTooLong, plainText);
                    line.Clear();
                    lineTooLong = false;
                    chunk = chunk[(nl + 1)..];
                }
            }
            if (line.WrittenCount > 0 || lineTooLong)
                state.OnLine(lineNo, line.WrittenSpan, lineTooLong, plainText);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }

        if (state.ExampleCount == 0 && state.ErrorCount == 0)
            state.AddError(0, "the dataset contains no examples");
        return new DatasetReadResult(state.Format, state.Examples, state.Errors, state.ErrorCount,
            Convert.ToHexStringLower(hash.GetHashAndReset()), total, state.ExampleCount);
    }

    internal static string FormatName(DatasetFormat f) => f switch
    {
        DatasetFormat.Chat => "chat (messages)",
        DatasetFormat.PromptCompletion => "prompt/completion",
        DatasetFormat.Alpaca => "Alpaca (instruction/input/output)",
        DatasetFormat.Text => "text",
        _ => "auto",
    };

    private sealed class ReadState(DatasetFormat format, DatasetLimits limits, bool keepExamples, Action<DatasetExample>? onExample)
    {
        private static readonly UTF8Encoding StrictUtf8 = new(false, throwOnInvalidBytes: true);
        private int _formatLine;
        private bool _stopped;

        public DatasetFormat Format { get; private set; } = format;
        public List<DatasetExample> Examples { get; } = [];
        public List<DatasetIssue> Errors { get; } = [];
        public int ErrorCount { get; private set; }
        public int ExampleCount { get; private set; }

        public void AddError(int line, string message)
        {
            ErrorCount++;
            if (Errors.Count < limits.MaxErrors) Errors.Add(new DatasetIssue(line, message));
        }

        public void OnLine(int lineNo, ReadOnlySpan<byte> bytes, bool tooLong, bool plainText)
        {
            if (_stopped) return;
            if (tooLong)
            {
                AddError(lineNo, $"line is longer than {limits.MaxLineBytes} bytes (Datasets:MaxLineBytes)");
                return;
            }
            if (lineNo == 1 && bytes.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) bytes = bytes[3..];
            if (!bytes.IsEmpty && bytes[^1] == (byte)'\r') bytes = bytes[..^1];
            if (bytes.Length > limits.MaxLineBytes)
            {
                AddError(lineNo, $"line is longer than {limits.MaxLineBytes} bytes (Datasets:MaxLineBytes)");
                return;
            }
            if (IsBlank(bytes)) return;
            if (ExampleCount >= limits.MaxExamples)
            {
                AddError(lineNo, $"the dataset has more than {limits.MaxExamples} examples (Datasets:MaxExamples)");
                _stopped = true;
                return;
            }

            if (!System.Text.Unicode.Utf8.IsValid(bytes))
            {
                AddError(lineNo, "line is not valid UTF-8");
                return;
            }

            DatasetExample? example;
            string? error;
            if (plainText) (example, error) = ParseText(lineNo, bytes);
            else (example, error) = ParseJsonLine(lineNo, bytes);
            if (error is not null) AddError(lineNo, error);
            else if (example is not null)
            {
                ExampleCount++;
                if (keepExamples) Examples.Add(example);
                onExample?.Invoke(example);
            }
        }

        private static bool IsBlank(ReadOnlySpan<byte> bytes) => bytes.IndexOfAnyExcept(" \t\r\f\v"u8) < 0;

        private static (DatasetExample?, string?) ParseText(int lineNo, ReadOnlySpan<byte> bytes)
        {
            try
            {
                return (new DatasetExample(lineNo, null, StrictUtf8.GetString(bytes)), null);
            }
            catch (DecoderFallbackException)
            {
                return (null, "line is not valid UTF-8");
            }
        }

        private (DatasetExample?, string?) ParseJsonLine(int lineNo, ReadOnlySpan<byte> bytes)
        {
            JsonDocument doc;
            try
            {
                // JsonDocument needs memory it can keep; the line buffer is reused, so parse from a copy.
                doc = JsonDocument.Parse(bytes.ToArray());
            }
            catch (JsonException e)
            {
                return (null, "invalid JSON: " + TidyJsonMessage(e.Message));
            }
            using (doc)
            {
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object)
                    return (null, $"expected a JSON object, got {Kind(root.ValueKind)}");
                var detected = Detect(root);
                if (Format == DatasetFormat.Auto)
                {
                    if (detected is not { } d)
                        return (null, "unrecognised format: expected an object with \"messages\", \"prompt\"/\"completion\", " +
                                      "\"instruction\"/\"output\" or \"text\"");
                    Format = d;
                    _formatLine = lineNo;
                }
                else if (detected is { } d && d != Format)
                {
                    var origin = _formatLine > 0 ? $"detected from line {_formatLine}" : "as declared";
                    return (null, $"line is in {FormatName(d)} format but the file is {FormatName(Format)} ({origin})");
                }
                return Format switch
                {
                    DatasetFormat.Chat => ParseChat(lineNo, root),
                    DatasetFormat.PromptCompletion => ParsePromptCompletion(lineNo, root),
                    DatasetFormat.Alpaca => ParseAlpaca(lineNo, root),
                    _ => ParseTextObject(lineNo, root),
                };
            }
        }
    }

    private static DatasetFormat? Detect(JsonElement o)
    {
        if (o.TryGetProperty("messages", out _)) return DatasetFormat.Chat;
        if (o.TryGetProperty("prompt", out _) || o.TryGetProperty("completion", out _)) return DatasetFormat.PromptCompletion;
        if (o.TryGetProperty("instruction", out _) || o.TryGetProperty("output", out _)) return DatasetFormat.Alpaca;
        if (o.TryGetProperty("text", out _)) return DatasetFormat.Text;
        return null;
    }

    private static readonly HashSet<string> Roles = ["system", "user", "assistant"];

    private static (DatasetExample?, string?) ParseChat(int lineNo, JsonElement o)
    {
        if (!o.TryGetProperty("messages", out var messages))
            return (null, "missing field \"messages\"");
        if (messages.ValueKind != JsonValueKind.Array)
            return (null, $"\"messages\" must be an array, got {Kind(messages.ValueKind)}");
        if (messages.GetArrayLength() == 0)
            return (null, "\"messages\" is empty");
        var list = new List<ChatMessage>(messages.GetArrayLength());
        var i = 0;
        foreach (var m in messages.EnumerateArray())
        {
            var where = $"messages[{i++}]";
            if (m.ValueKind != JsonValueKind.Object)
                return (null, $"{where} must be an object, got {Kind(m.ValueKind)}");
            var (role, roleError) = RequiredString(m, "role", where);
            if (roleError is not null) return (null, roleError);
            if (!Roles.Contains(role!))
                return (null, $"{where}.role \"{Truncate(role!)}\" is not one of system, user, assistant");
            var (content, contentError) = RequiredString(m, "content", where);
            if (contentError is not null) return (null, contentError);
            list.Add(new ChatMessage(role!, content!));
        }
        if (!list.Exists(m => m.Role == "assistant"))
            return (null, "\"messages\" has no assistant message");
        return (new DatasetExample(lineNo, null, null, list), null);
    }

    private static (DatasetExample?, string?) ParsePromptCompletion(int lineNo, JsonElement o)
    {
        var (prompt, e1) = RequiredString(o, "prompt", null);
        if (e1 is not null) return (null, e1);
        var (completion, e2) = RequiredString(o, "completion", null);
        if (e2 is not null) return (null, e2);
        return (new DatasetExample(lineNo, prompt, completion), null);
    }

    private static (DatasetExample?, string?) ParseAlpaca(int lineNo, JsonElement o)
    {
        var (instruction, e1) = RequiredString(o, "instruction", null);
        if (e1 is not null) return (null, e1);
        string? input = null;
        if (o.TryGetProperty("input", out var inputEl) && inputEl.ValueKind != JsonValueKind.Null)
        {
            if (inputEl.ValueKind != JsonValueKind.String)
                return (null, $"\"input\" must be a string, got {Kind(inputEl.ValueKind)}");
            input = inputEl.GetString();
        }
        var (output, e2) = RequiredString(o, "output", null);
        if (e2 is not null) return (null, e2);
        return (new DatasetExample(lineNo, AlpacaPrompt(instruction!, input), output), null);
    }

    private static (DatasetExample?, string?) ParseTextObject(int lineNo, JsonElement o)
    {
        var (text, error) = RequiredString(o, "text", null);
        return error is null ? (new DatasetExample(lineNo, null, text), null) : (null, error);
    }

    private static (string? Value, string? Error) RequiredString(JsonElement o, string name, string? parent)
    {
        var field = parent is null ? $"\"{name}\"" : $"{parent}.{name}";
        if (!o.TryGetProperty(name, out var el))
            return (null, $"missing field {field}");
        if (el.ValueKind != JsonValueKind.String)
            return (null, $"{field} must be a string, got {Kind(el.ValueKind)}");
        var s = el.GetString()!;
        return s.Length == 0 ? (null, $"{field} is an empty string") : (s, null);
    }

    private static string Kind(JsonValueKind k) => k switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => k.ToString(),
    };

    private static string Truncate(string s) => s.Length <= 40 ? s : s[..40] + "…";

    // The reader sees one line at a time, so its "LineNumber: 0" is noise; keep the byte position.
    private static string TidyJsonMessage(string message) =>
        JsonPosition().Replace(message, "(at byte $1)");

    [GeneratedRegex(@"LineNumber: \d+ \| BytePositionInLine: (\d+)\.")]
    private static partial Regex JsonPosition();
}
