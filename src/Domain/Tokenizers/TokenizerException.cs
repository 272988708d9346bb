namespace FineTune.Domain.Tokenizers;

/// <summary>A tokenizer file that cannot be loaded or used (malformed, or a component this version does not support).</summary>
public sealed class TokenizerException(string message, Exception? inner = null) : Exception(message, inner);
