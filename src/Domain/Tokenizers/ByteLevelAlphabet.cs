using System.Text;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// GPT-2's reversible byte ↔ character table: printable Latin-1 bytes map to themselves, the other 68 bytes to
/// U+0100 onwards, so any byte string becomes a string of visible characters (space is 'Ġ', newline 'Ċ').
/// </summary>
public static class ByteLevelAlphabet
{
    private static readonly char[] ToChar = BuildTable();
    private static readonly Dictionary<char, byte> ToByte = ToChar.Select((c, b) => (c, b)).ToDictionary(x => x.c, x => (byte)x.b);

    public static char ByteToChar(byte b) => ToChar[b];

    public static bool TryCharToByte(char c, out byte b) => ToByte.TryGetValue(c, out b);

    /// <summary>The text's UTF-8 bytes, each written as its table character.</summary>
    public static string Encode(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        return string.Create(bytes.Length, bytes, static (span, bs) =>
        {
            for (var i = 0; i < bs.Length; i++) span[i] = ToChar[bs[i]];
        });
    }

    private static char[] BuildTable()
    {
        var table = new char[256];
        var assigned = new bool[256];
        for (var b = '!'; b <= '~'; b++) assigned[b] = true;
        for (var b = '¡'; b <= '¬'; b++) assigned[b] = true;
        for (var b = '®'; b <= 'ÿ'; b++) assigned[b] = true;
        var n = 0;
        for (var b = 0; b < 256; b++) table[b] = assigned[b] ? (char)b : (char)(256 + n++);
        return table;
    }
}
