using Google.Protobuf;

namespace FineTune.Domain.Tokenizers;

internal enum PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 }

internal enum SentencePieceModelType { Unigram = 1, Bpe = 2, Word = 3, Char = 4 }

internal sealed record SentencePiece(string Piece, float Score, PieceType Type);

/// <summary>
/// The parts of a SentencePiece <c>tokenizer.model</c> (protobuf <c>sentencepiece.ModelProto</c>, proto2) that encoding
/// needs, read with <see cref="CodedInputStream"/> by the field numbers of sentencepiece_model.proto: pieces (1),
/// trainer_spec (2), normalizer_spec (3). Defaults are the proto's.
/// </summary>
internal sealed class SentencePieceModel
{
    public const long MaxFileBytes = 64L << 20;

    public List<SentencePiece> Pieces { get; } = [];
    public SentencePieceModelType ModelType { get; private set; } = SentencePieceModelType.Unigram;
    public bool ByteFallback { get; private set; }
    public bool TreatWhitespaceAsSuffix { get; private set; }
    public string UnkPiece { get; private set; } = "<unk>";
    public string BosPiece { get; private set; } = "<s>";
    public string EosPiece { get; private set; } = "</s>";
    public string PadPiece { get; private set; } = "<pad>";
    public string UnkSurface { get; private set; } = " \u2047 ";
    public string NormalizerName { get; private set; } = "";
    public byte[] PrecompiledCharsmap { get; private set; } = [];
    public bool AddDummyPrefix { get; private set; } = true;
    public bool RemoveExtraWhitespaces { get; private set; } = true;
    public bool EscapeWhitespaces { get; private set; } = true;
    public bool HasDenormalizer { get; private set; }

    public static SentencePieceModel Parse(byte[] data)
    {
        var model = new SentencePieceModel();
        try
        {
            var input = new CodedInputStream(data);
            uint tag;
            while ((tag = input.ReadTag()) != 0)
            {
                switch (WireFormat.GetTagFieldNumber(tag))
                {
                    case 1: model.Pieces.Add(ReadPiece(Message(input, tag, "pieces"))); break;
                    case 2: model.ReadTrainerSpec(Message(input, tag, "trainer_spec")); break;
                    case 3: model.ReadNormalizerSpec(Message(input, tag, "normalizer_spec")); break;
                    case 5:
                        Message(input, tag, "denormalizer_spec");
                        model.HasDenormalizer = true;
                        break;
                    default: input.SkipLastField(); break;
                }
            }
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new TokenizerException($"tokenizer.model is not a SentencePiece model (protobuf: {e.Message})", e);
        }
        return model;
    }

    private static CodedInputStream Message(CodedInputStream input, uint tag, string field)
    {
        Expect(tag, WireFormat.WireType.LengthDelimited, field);
        return new CodedInputStream(input.ReadBytes().ToByteArray());
    }

    private static void Expect(uint tag, WireFormat.WireType type, string field)
    {
        if (WireFormat.GetTagWireType(tag) != type)
            throw new TokenizerException(
                $"tokenizer.model is not a SentencePiece model (field {field} has wire type {WireFormat.GetTagWireType(tag)}, expected {type})");
    }

    private static SentencePiece ReadPiece(CodedInputStream input)
    {
        string piece = "";
        float score = 0;
        var type = PieceType.Normal;
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            switch (WireFormat.GetTagFieldNumber(tag))
            {
                case 1: Expect(tag, WireFormat.WireType.LengthDelimited, "piece"); piece = input.ReadString(); break;
                case 2: Expect(tag, WireFormat.WireType.Fixed32, "score"); score = input.ReadFloat(); break;
                case 3:
                    Expect(tag, WireFormat.WireType.Varint, "type");
                    var t = input.ReadEnum();
                    if (!Enum.IsDefined((PieceType)t)) throw new TokenizerException($"tokenizer.model: piece type {t} is not known");
                    type = (PieceType)t;
                    break;
                default: input.SkipLastField(); break;
            }
        }
        return new SentencePiece(piece, score, type);
    }

    private void ReadTrainerSpec(CodedInputStream input)
    {
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            switch (WireFormat.GetTagFieldNumber(tag))
            {
                case 3: Expect(tag, WireFormat.WireType.Varint, "model_type"); ModelType = (SentencePieceModelType)input.ReadEnum(); break;
                case 24: Expect(tag, WireFormat.WireType.Varint, "treat_whitespace_as_suffix"); TreatWhitespaceAsSuffix = input.ReadBool(); break;
                case 35: Expect(tag, WireFormat.WireType.Varint, "byte_fallback"); ByteFallback = input.ReadBool(); break;
                case 44: Expect(tag, WireFormat.WireType.LengthDelimited, "unk_surface"); UnkSurface = input.ReadString(); break;
                case 45: Expect(tag, WireFormat.WireType.LengthDelimited, "unk_piece"); UnkPiece = input.ReadString(); break;
                case 46: Expect(tag, WireFormat.WireType.LengthDelimited, "bos_piece"); BosPiece = input.ReadString(); break;
                case 47: Expect(tag, WireFormat.WireType.LengthDelimited, "eos_piece"); EosPiece = input.ReadString(); break;
                case 48: Expect(tag, WireFormat.WireType.LengthDelimited, "pad_piece"); PadPiece = input.ReadString(); break;
                default: input.SkipLastField(); break;
            }
        }
    }

    private void ReadNormalizerSpec(CodedInputStream input)
    {
        uint tag;
        while ((tag = input.ReadTag()) != 0)
        {
            switch (WireFormat.GetTagFieldNumber(tag))
            {
                case 1: Expect(tag, WireFormat.WireType.LengthDelimited, "name"); NormalizerName = input.ReadString(); break;
                case 2: Expect(tag, WireFormat.WireType.LengthDelimited, "precompiled_charsmap"); PrecompiledCharsmap = input.ReadBytes().ToByteArray(); break;
                case 3: Expect(tag, WireFormat.WireType.Varint, "add_dummy_prefix"); AddDummyPrefix = input.ReadBool(); break;
                case 4: Expect(tag, WireFormat.WireType.Varint, "remove_extra_whitespaces"); RemoveExtraWhitespaces = input.ReadBool(); break;
                case 5: Expect(tag, WireFormat.WireType.Varint, "escape_whitespaces"); EscapeWhitespaces = input.ReadBool(); break;
                default: input.SkipLastField(); break;
            }
        }
    }
}
