namespace FineTune.Domain.Datasets;

/// <summary>
/// One training example, normalised from whichever format the file used. Loss is taken on <see cref="Completion"/>
/// only (plain text: Prompt is null and the whole text is the completion), or, for chat, on assistant turns only.
/// </summary>
/// <param name="Line">1-based line number in the source file (for errors found later, e.g. while tokenizing).</param>
public sealed record DatasetExample(int Line, string? Prompt, string? Completion, IReadOnlyList<ChatMessage>? Messages = null);

public sealed record ChatMessage(string Role, string Content);

/// <summary>A problem with one line of a dataset file.</summary>
public sealed record DatasetIssue(int Line, string Message)
{
    public override string ToString() => $"line {Line}: {Message}";
}
