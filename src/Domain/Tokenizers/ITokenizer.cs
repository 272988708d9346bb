namespace FineTune.Domain.Tokenizers;

/// <summary>Text ↔ token ids, as the model's Hugging Face tokenizer would do it.</summary>
public interface ITokenizer
{
    int VocabSize { get; }
    int? BosId { get; }
    int? EosId { get; }
    /// <summary>Padding id (falls back to EOS when the tokenizer has no pad token).</summary>
    int PadId { get; }
    /// <summary>Encodes text. Special tokens written in the text (e.g. "&lt;|im_start|&gt;") are recognised.
    /// <paramref name="addSpecialTokens"/> adds BOS/EOS as the tokenizer's post-processor would.</summary>
    int[] Encode(string text, bool addSpecialTokens = false);
    string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false);
    /// <summary>Id of a special/added token, or null.</summary>
    int? TokenToId(string token);
    /// <summary>The token text of an id (e.g. "&lt;s&gt;" for BOS), or null.</summary>
    string? IdToToken(int id) => null;
    /// <summary>The model's chat format (tokenizer_config.json's chat_template), or null for the default (ChatML).</summary>
    ChatTemplate? ChatTemplate => null;
}
