using System.Text;
using System.Text.RegularExpressions;
using FineTune.Domain.Datasets;

namespace FineTune.Domain.Tokenizers;

/// <summary>A piece of rendered chat text; <paramref name="Loss"/>: the model is trained to produce it.</summary>
public sealed record ChatSegment(string Text, bool Loss);

/// <summary>A conversation the template cannot render (a role it does not allow, roles that do not alternate).</summary>
public sealed class ChatTemplateException(string message) : Exception(message);

/// <summary>
/// The chat format of a model, recognised from the Jinja <c>chat_template</c> of its tokenizer_config.json by the
/// markers of each family, and rendered here as the reference template renders it (with <c>add_generation_prompt</c>
/// false), cut into segments so that loss falls on assistant turns only (their content and end-of-turn token):
/// <list type="bullet">
/// <item>ChatML / Qwen (<c>&lt;|im_start|&gt;</c>): <c>&lt;|im_start|&gt;role\ncontent&lt;|im_end|&gt;\n</c>; a system
/// turn written literally in the template (Qwen's "You are a helpful assistant.") is put first when the conversation
/// has none.</item>
/// <item>Llama 3 (<c>&lt;|start_header_id|&gt;</c>): bos, then <c>&lt;|start_header_id|&gt;role&lt;|end_header_id|&gt;\n\n</c>
/// + trimmed content + <c>&lt;|eot_id|&gt;</c>; the 3.1+ templates always open with a system turn carrying
/// "Cutting Knowledge Date" and "Today Date" (the template's fixed date_string, not today's date).</item>
/// <item>Llama 2 (<c>[INST]</c> with <c>&lt;&lt;SYS&gt;&gt;</c>): bos + <c>[INST] </c> + stripped user content +
/// <c> [/INST]</c>, then <c> </c> + stripped answer + <c> </c> + eos per exchange; the system prompt goes into the first
/// user turn between <c>&lt;&lt;SYS&gt;&gt;\n</c> and <c>\n&lt;&lt;/SYS&gt;&gt;\n\n</c>.</item>
/// <item>Mistral (<c>[INST]</c> without <c>&lt;&lt;SYS&gt;&gt;</c>): v0.1 (bos once, <c>[INST] q [/INST]</c> + answer +
/// eos + " ", no system role) and v0.2 (<c> [INST] </c>, answer after a space, system prompt + "\n\n" before the first
/// user message).</item>
/// </list>
/// A template of none of these families is not guessed at: rendering a conversation with it is an error naming it.
/// </summary>
public sealed partial class ChatTemplate
{
    public const string ChatMl = "chatml", Llama3 = "llama3", Llama31 = "llama3.1", Llama2 = "llama2",
        MistralV1 = "mistral", MistralV2 = "mistral-v0.2";
    public static readonly string[] Names = [ChatMl, Llama3, Llama31, Llama2, MistralV1, MistralV2];
    private const string Recognised = "ChatML/Qwen (<|im_start|>), Llama 3 (<|start_header_id|>), Llama 2/Mistral ([INST])";

    private readonly string? _unsupported;

    /// <summary>One of <see cref="Names"/>, or "unrecognised".</summary>
    public string Name { get; }
    /// <summary>ChatML: the system prompt put first when a conversation has none.</summary>
    public string? DefaultSystem { get; init; }
    /// <summary>Llama 3.1+: the knowledge cutoff and date written in the system turn.</summary>
    public string CuttingKnowledgeDate { get; init; } = "December 2023";
    public string DateString { get; init; } = "26 Jul 2024";
    /// <summary>Mistral v0.1: the later revision of its template writes a space after each answer's eos.</summary>
    public bool MistralSpaceAfterEos { get; init; } = true;
    /// <summary>Whether this template came from tokenizer_config.json (true) or is the configured default.</summary>
    public bool FromModel { get; init; }
    /// <summary>The configured default only (templates write their own bos): put the tokenizer's bos first
    /// (tokenizer_config.json's add_bos_token).</summary>
    public bool AddBos { get; init; } = true;

    private ChatTemplate(string name, string? unsupported = null) => (Name, _unsupported) = (name, unsupported);

    public bool IsSupported => _unsupported is null;

    /// <summary>A template by name (the configured default for models without a chat_template).</summary>
    public static ChatTemplate Named(string name, bool addBos = true) =>
        Names.Contains(name) ? new ChatTemplate(name) { AddBos = addBos }
            : throw new ArgumentException($"unknown chat template '{name}'; known: {string.Join(", ", Names)}");

    /// <summary>Recognises a Jinja chat template. An unrecognised one is returned as such: using it is the error.</summary>
    public static ChatTemplate Detect(string jinja)
    {
        if (jinja.Contains("<|im_start|>"))
        {
            if (jinja.Contains("<think>"))
                return new ChatTemplate("unrecognised",
                    "a ChatML chat template with reasoning blocks (<think>, as Qwen3's) is not supported: its rendering depends on the turn's position");
            var m = ChatMlSystemLiteral().Match(jinja);
            return new ChatTemplate(ChatMl) { DefaultSystem = m.Success ? Unescape(m.Groups["text"].Value) : null, FromModel = true };
        }
        if (jinja.Contains("<|start_header_id|>"))
        {
            if (!jinja.Contains("Cutting Knowledge Date")) return new ChatTemplate(Llama3) { FromModel = true };
            var cutoff = CutoffLiteral().Match(jinja);
            var date = DateLiteral().Match(jinja);
            return new ChatTemplate(Llama31)
            {
                CuttingKnowledgeDate = cutoff.Success ? Unescape(cutoff.Groups["text"].Value) : "December 2023",
                DateString = date.Success ? date.Groups["text"].Value : "26 Jul 2024",
                FromModel = true,
            };
        }
        if (jinja.Contains("[INST]"))
        {
            if (jinja.Contains("<<SYS>>")) return new ChatTemplate(Llama2) { FromModel = true };
            if (jinja.Contains("' [INST] '")) return new ChatTemplate(MistralV2) { FromModel = true };
            if (jinja.Contains("'[INST] '"))
                return new ChatTemplate(MistralV1) { FromModel = true, MistralSpaceAfterEos = jinja.Contains("eos_token + ' '") };
            return new ChatTemplate("unrecognised",
                $"an [INST] chat template that is neither the Llama 2 (<<SYS>>) nor the Mistral v0.1/v0.2 one: {Excerpt(jinja)}");
        }
        return new ChatTemplate("unrecognised",
            $"the model's chat template is not one this service renders (recognised: {Recognised}): {Excerpt(jinja)}");
    }

    /// <summary>The rendered conversation in segments. <paramref name="bos"/>/<paramref name="eos"/> are the
    /// tokenizer's bos_token and eos_token text.</summary>
    public IReadOnlyList<ChatSegment> Render(IReadOnlyList<ChatMessage> messages, string? bos, string? eos)
    {
        if (_unsupported is not null) throw new ChatTemplateException(_unsupported);
        var output = new List<ChatSegment>();
        void Emit(string text, bool loss = false)
        {
            if (text.Length > 0) output.Add(new ChatSegment(text, loss));
        }
        switch (Name)
        {
            case ChatMl:
                if (DefaultSystem is not null && (messages.Count == 0 || messages[0].Role != "system"))
                    Emit($"<|im_start|>system\n{DefaultSystem}<|im_end|>\n");
                foreach (var m in messages)
                {
                    var assistant = m.Role == "assistant";
                    Emit($"<|im_start|>{m.Role}\n");
                    Emit(m.Content + "<|im_end|>", assistant);
                    Emit("\n");
                }
                break;
            case Llama3:
                Emit(bos ?? "");
                foreach (var m in messages) Llama3Turn(m.Role, JinjaTrim(m.Content), m.Role == "assistant");
                break;
            case Llama31:
            {
                Emit(bos ?? "");
                var hasSystem = messages.Count > 0 && messages[0].Role == "system";
                var system = hasSystem ? JinjaTrim(messages[0].Content) : "";
                Emit("<|start_header_id|>system<|end_header_id|>\n\n" +
                     $"Cutting Knowledge Date: {CuttingKnowledgeDate}\nToday Date: {DateString}\n\n{system}<|eot_id|>");
                foreach (var m in messages.Skip(hasSystem ? 1 : 0))
                    Llama3Turn(m.Role, JinjaTrim(m.Content), m.Role == "assistant");
                break;
            }
            case Llama2:
            {
                var (system, turns) = SplitSystem(messages);
                CheckAlternation(turns);
                for (var i = 0; i < turns.Count; i++)
                {
                    var content = i == 0 && system is not null ? $"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[i].Content}" : turns[i].Content;
                    if (turns[i].Role == "user") Emit($"{bos}[INST] {PyStrip(content)} [/INST]");
                    else Emit($" {PyStrip(content)} {eos}", loss: true);
                }
                break;
            }
            case MistralV1:
            {
                if (messages.Any(m => m.Role == "system"))
                    throw new ChatTemplateException("the model's chat template (Mistral v0.1) has no system role: only user and assistant turns");
                CheckAlternation(messages);
                Emit(bos ?? "");
                foreach (var m in messages)
                    if (m.Role == "user") Emit($"[INST] {m.Content} [/INST]");
                    else
                    {
                        Emit(m.Content + eos, loss: true);
                        if (MistralSpaceAfterEos) Emit(" ");
                    }
                break;
            }
            case MistralV2:
            {
                var (system, turns) = SplitSystem(messages);
                CheckAlternation(turns);
                Emit(bos ?? "");
                for (var i = 0; i < turns.Count; i++)
                    if (turns[i].Role == "user")
                        Emit(i == 0 && system is not null ? $" [INST] {system}\n\n{turns[i].Content} [/INST]" : $" [INST] {turns[i].Content} [/INST]");
                    else Emit($" {turns[i].Content}{eos}", loss: true);
                break;
            }
        }
        return output;

        void Llama3Turn(string role, string content, bool assistant)
        {
            Emit($"<|start_header_id|>{role}<|end_header_id|>\n\n");
            Emit(content + "<|eot_id|>", assistant);
        }
    }

    private static (string? System, List<ChatMessage> Turns) SplitSystem(IReadOnlyList<ChatMessage> messages)
    {
        var system = messages.Count > 0 && messages[0].Role == "system" ? messages[0].Content : null;
        var turns = messages.Skip(system is null ? 0 : 1).ToList();
        if (turns.Any(t => t.Role == "system"))
            throw new ChatTemplateException("the model's chat template allows a system message only as the first message");
        return (system, turns);
    }

    // The [INST] templates raise_exception unless roles go user, assistant, user, ...
    private static void CheckAlternation(IReadOnlyList<ChatMessage> turns)
    {
        for (var i = 0; i < turns.Count; i++)
            if ((turns[i].Role == "user") != (i % 2 == 0))
                throw new ChatTemplateException(
                    $"the model's chat template needs roles alternating user/assistant/user/... (message {i + 1} is {turns[i].Role})");
    }

    // Jinja's trim filter and Python's str.strip(): Unicode whitespace at both ends.
    private static string JinjaTrim(string s) => PyStrip(s);
    private static string PyStrip(string s)
    {
        int start = 0, end = s.Length;
        while (start < end && IsPyWhitespace(s[start])) start++;
        while (end > start && IsPyWhitespace(s[end - 1])) end--;
        return s[start..end];
    }

    // str.isspace: White_Space plus the separators \x1c-\x1f that Python also counts.
    private static bool IsPyWhitespace(char c) => char.IsWhiteSpace(c) || c is >= '\x1c' and <= '\x1f';

    private static string Unescape(string literal)
    {
        var sb = new StringBuilder(literal.Length);
        for (var i = 0; i < literal.Length; i++)
        {
            if (literal[i] != '\\' || i + 1 == literal.Length) { sb.Append(literal[i]); continue; }
            var c = literal[++i];
            sb.Append(c switch { 'n' => '\n', 't' => '\t', 'r' => '\r', _ => c });
        }
        return sb.ToString();
    }

    private static string Excerpt(string jinja) =>
        jinja.Length <= 120 ? jinja : jinja[..120].ReplaceLineEndings(" ") + "…";

    // A ChatML system turn written out as one string literal: '<|im_start|>system\nYou are ...<|im_end|>\n'.
    [GeneratedRegex(@"(?<q>['""])<\|im_start\|>system\\n(?<text>(?:(?!\k<q>)[^\\{}]|\\.)*?)<\|im_end\|>")]
    private static partial Regex ChatMlSystemLiteral();

    [GeneratedRegex(@"Cutting Knowledge Date: (?<text>[^""'\\]*)\\n")]
    private static partial Regex CutoffLiteral();

    [GeneratedRegex(@"set date_string = (?<q>['""])(?<text>[^'""]*)\k<q>")]
    private static partial Regex DateLiteral();
}
