using System.Text.Json;
using FineTune.Domain.Datasets;
using FineTune.Domain.Tokenizers;

namespace FineTune.Worker.Tests.Tokenizers;

/// <summary>
/// Our chat rendering against the reference templates (ChatTemplates/*.jinja, written after the models'
/// tokenizer_config.json templates), rendered by tests/parity/chat_templates.py: transformers' renderer where it is
/// installed, else jinja2 in transformers' environment. expected.json says which.
/// </summary>
public sealed class ChatTemplateParityTests
{
    private static readonly string Root = Path.Combine(AppContext.BaseDirectory, "Tokenizers", "ChatTemplates");

    public static TheoryData<string> Templates() =>
        new(JsonDocument.Parse(File.ReadAllText(Path.Combine(Root, "templates.json"))).RootElement.EnumerateObject()
            .Select(p => p.Name).Order().ToArray());

    [Theory]
    [MemberData(nameof(Templates))]
    public void Renders_as_the_reference_template(string name)
    {
        var expectedPath = Path.Combine(Root, "expected.json");
        Assert.SkipUnless(File.Exists(expectedPath), "no ChatTemplates/expected.json yet: run tests/parity/chat_templates.py");
        using var spec = JsonDocument.Parse(File.ReadAllText(Path.Combine(Root, "templates.json")));
        var s = spec.RootElement.GetProperty(name);
        var template = ChatTemplate.Detect(File.ReadAllText(Path.Combine(Root, $"{name}.jinja")));
        Assert.Equal(s.GetProperty("expect").GetString(), template.Name);
        using var expected = JsonDocument.Parse(File.ReadAllText(expectedPath));
        var failures = new List<string>();
        foreach (var c in expected.RootElement.GetProperty("templates").GetProperty(name).EnumerateArray())
        {
            var messages = c.GetProperty("messages").EnumerateArray()
                .Select(m => new ChatMessage(m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!)).ToList();
            string? rendered = null, error = null;
            try
            {
                rendered = string.Concat(template.Render(messages, s.GetProperty("bos_token").GetString(),
                    s.GetProperty("eos_token").GetString()).Select(x => x.Text));
            }
            catch (ChatTemplateException e) { error = e.Message; }
            var conversation = string.Join(" | ", messages.Select(m => $"{m.Role}: {m.Content}"));
            if (c.TryGetProperty("error", out _))
            {
                if (error is null) failures.Add($"[{conversation}] the reference raises, we rendered {JsonSerializer.Serialize(rendered)}");
            }
            else if (c.GetProperty("rendered").GetString() != rendered)
                failures.Add($"[{conversation}] expected {JsonSerializer.Serialize(c.GetProperty("rendered").GetString())}, " +
                             $"got {JsonSerializer.Serialize(rendered ?? error)}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }
}

public sealed class ChatTemplateTests
{
    private static readonly string Root = Path.Combine(AppContext.BaseDirectory, "Tokenizers");

    private static ChatTemplate Fixture(string name) =>
        ChatTemplate.Detect(File.ReadAllText(Path.Combine(Root, "ChatTemplates", $"{name}.jinja")));

    private static readonly ChatMessage[] Exchange =
        [new("system", "Be brief."), new("user", "Hi"), new("assistant", "Hello."), new("user", "Bye"), new("assistant", "Bye!")];

    [Theory]
    [InlineData("qwen2", "Hello.<|im_end|>|Bye!<|im_end|>")]
    [InlineData("llama3_1", "Hello.<|eot_id|>|Bye!<|eot_id|>")]
    [InlineData("llama2", " Hello. </s>| Bye! </s>")]
    [InlineData("mistral_v2", " Hello.</s>| Bye!</s>")]
    public void Loss_is_on_assistant_content_and_its_end_of_turn_token(string name, string lossText)
    {
        var segments = Fixture(name).Render(Exchange, name.StartsWith("llama3") ? "<|begin_of_text|>" : "<s>",
            name == "qwen2" ? "<|im_end|>" : name.StartsWith("llama3") ? "<|eot_id|>" : "</s>");
        Assert.Equal(lossText, string.Join("|", segments.Where(s => s.Loss).Select(s => s.Text)));
    }

    [Fact]
    public void Qwen_default_system_prompt_comes_from_the_template()
    {
        var t = Fixture("qwen2");
        Assert.Equal("You are a helpful assistant.", t.DefaultSystem);
        Assert.Null(Fixture("chatml").DefaultSystem);
        var text = string.Concat(t.Render([new("user", "q"), new("assistant", "a")], null, "<|im_end|>").Select(s => s.Text));
        Assert.StartsWith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq", text);
    }

    [Theory]
    [InlineData("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}", "not one this service renders")]
    [InlineData("{% for m in messages %}<|im_start|>{{ m.role }}\n<think>\n\n</think>{{ m.content }}<|im_end|>{% endfor %}", "reasoning blocks")]
    [InlineData("{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}", "neither the Llama 2")]
    public void Unrecognised_templates_fail_on_use_with_a_message_naming_them(string jinja, string message)
    {
        var t = ChatTemplate.Detect(jinja);
        Assert.False(t.IsSupported);
        var e = Assert.Throws<ChatTemplateException>(() => t.Render([new("user", "q"), new("assistant", "a")], "<s>", "</s>"));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void The_encoder_tokenizes_the_rendered_text_whole_and_learns_only_the_answers()
    {
        // A SentencePiece-style tokenizer: tokenizing turns one by one would give each a ▁ prefix of its own.
        var dir = ModelDir("llama2_sp", "llama2");
        var tokenizer = TokenizerLoader.Load(dir);
        Assert.Equal(ChatTemplate.Llama2, tokenizer.ChatTemplate!.Name);
        var example = new DatasetExample(4, null, null, Exchange);
        var encoded = ExampleEncoder.Encode(example, tokenizer, 4096);
        var rendered = string.Concat(tokenizer.ChatTemplate.Render(Exchange, "<s>", "</s>").Select(s => s.Text));
        Assert.Equal(tokenizer.Encode(rendered), encoded.Ids);
        Assert.Equal(2, encoded.Ids.Count(id => id == tokenizer.BosId));
        var learned = encoded.Ids.Where((_, i) => encoded.Labels[i] != EncodedExample.Ignore).ToArray();
        // The answers' ▁ is the one the template's space becomes in context (no second ▁ of a separate encode).
        Assert.Equal("Hello. </s> Bye! </s>", tokenizer.Decode(learned));

        var bad = new DatasetExample(9, null, null, [new ChatMessage("assistant", "a"), new ChatMessage("user", "q")]);
        var e = Assert.Throws<DatasetEncodingException>(() => ExampleEncoder.Encode(bad, tokenizer, 64));
        Assert.Equal(9, e.Line);
        Assert.Contains("alternating", e.Message);
    }

    [Fact]
    public void Template_comes_from_tokenizer_config_or_chat_template_jinja_else_the_configured_default()
    {
        var dir = ModelDir("mistral_metaspace", template: null);
        Assert.Equal(ChatTemplate.ChatMl, TokenizerLoader.Load(dir).ChatTemplate!.Name);
        Assert.Equal(ChatTemplate.Llama3, TokenizerLoader.Load(dir, defaultChatTemplate: ChatTemplate.Llama3).ChatTemplate!.Name);
        File.Copy(Path.Combine(Root, "ChatTemplates", "mistral_v1.jinja"), Path.Combine(dir, "chat_template.jinja"));
        var t = TokenizerLoader.Load(dir);
        Assert.Equal(ChatTemplate.MistralV1, t.ChatTemplate!.Name);
        Assert.True(t.ChatTemplate.FromModel);

        var encoded = ExampleEncoder.Encode(new DatasetExample(1, null, null, [new("user", "q"), new("assistant", "a")]), t, 256);
        // The template writes the one BOS; "[INST]" is an added token of this fixture.
        Assert.Equal(t.Encode("<s>[INST] q [/INST]a</s> "), encoded.Ids);
        Assert.Equal(1, encoded.Ids.Count(id => id == t.BosId));
        var withSystem = new DatasetExample(2, null, null, [new("system", "s"), new("user", "q"), new("assistant", "a")]);
        Assert.Contains("no system role", Assert.Throws<DatasetEncodingException>(() => ExampleEncoder.Encode(withSystem, t, 64)).Message);
    }

    /// <summary>A copy of a tokenizer fixture with a tokenizer_config.json carrying the given chat template.</summary>
    private static string ModelDir(string tokenizer, string? template)
    {
        var dir = Path.Combine(Path.GetTempPath(), $"ft-chat-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        foreach (var f in Directory.GetFiles(Path.Combine(Root, "Parity", tokenizer)))
            File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        var config = JsonSerializer.Deserialize<Dictionary<string, object?>>(File.ReadAllText(Path.Combine(dir, "tokenizer_config.json")))!;
        if (template is not null) config["chat_template"] = File.ReadAllText(Path.Combine(Root, "ChatTemplates", $"{template}.jinja"));
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), JsonSerializer.Serialize(config));
        return dir;
    }
}
