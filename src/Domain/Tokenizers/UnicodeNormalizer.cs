using System.Text;

namespace FineTune.Domain.Tokenizers;

/// <summary>
/// Canonical Unicode normalization (NFC, NFD) from our own tables: with InvariantGlobalization (set for the whole
/// solution) <see cref="string.Normalize()"/> returns non-ASCII text unchanged, which would silently tokenize
/// differently from the HF library for tokenizers with an NFC normalizer (Qwen2).
/// Follows UAX #15: full canonical decomposition (Hangul algorithmically), canonical ordering, canonical composition.
/// </summary>
internal static class UnicodeNormalizer
{
    private const int SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7;
    private const int LCount = 19, VCount = 21, TCount = 28, NCount = VCount * TCount, SCount = LCount * NCount;

    private static readonly Dictionary<int, (int First, int Second)> Decomposition = BuildDecomposition();
    private static readonly Dictionary<long, int> Composition = BuildComposition();

    public static string Nfc(string s) => IsStable(s) ? s : Compose(Decompose(s));

    // Nothing below U+00C0 decomposes.
    public static string Nfd(string s) => s.AsSpan().IndexOfAnyExceptInRange('\0', '\u00BF') < 0 ? s : ToString(Decompose(s));

    // Below U+0300 everything is already NFC and nothing combines (checked against unicodedata for every code point).
    private static bool IsStable(string s) => s.AsSpan().IndexOfAnyExceptInRange('\0', '\u02FF') < 0;

    private static List<int> Decompose(string s)
    {
        var result = new List<int>(s.Length + 8);
        foreach (var rune in s.EnumerateRunes()) DecomposeInto(rune.Value, result);
        // Canonical ordering: a stable sort of each run of non-starters by combining class.
        for (var i = 1; i < result.Count; i++)
        {
            var ccc = CombiningClass(result[i]);
            if (ccc == 0) continue;
            var j = i;
            while (j > 0 && CombiningClass(result[j - 1]) > ccc)
            {
                (result[j - 1], result[j]) = (result[j], result[j - 1]);
                j--;
            }
        }
        return result;
    }

    private static void DecomposeInto(int cp, List<int> output)
    {
        if (cp is >= SBase and < SBase + SCount)
        {
            var index = cp - SBase;
            output.Add(LBase + index / NCount);
            output.Add(VBase + index % NCount / TCount);
            if (index % TCount != 0) output.Add(TBase + index % TCount);
            return;
        }
        if (Decomposition.TryGetValue(cp, out var d))
        {
            DecomposeInto(d.First, output);
            if (d.Second >= 0) DecomposeInto(d.Second, output);
            return;
        }
        output.Add(cp);
    }

    private static string Compose(List<int> cps)
    {
        if (cps.Count == 0) return "";
        var result = new List<int>(cps.Count) { cps[0] };
        var starterPos = 0;
        var lastClass = CombiningClass(cps[0]) == 0 ? 0 : 256; // a leading non-starter has no starter to join
        for (var i = 1; i < cps.Count; i++)
        {
            var cp = cps[i];
            var ccc = CombiningClass(cp);
            if ((lastClass < ccc || lastClass == 0) && TryCompose(result[starterPos], cp, out var composite))
            {
                result[starterPos] = composite;
                continue;
            }
            if (ccc == 0) starterPos = result.Count;
            lastClass = ccc;
            result.Add(cp);
        }
        return ToString(result);
    }

    private static bool TryCompose(int a, int b, out int composite)
    {
        if (a is >= LBase and < LBase + LCount && b is >= VBase and < VBase + VCount)
        {
            composite = SBase + ((a - LBase) * VCount + (b - VBase)) * TCount;
            return true;
        }
        if (a is >= SBase and < SBase + SCount && (a - SBase) % TCount == 0 && b is > TBase and < TBase + TCount)
        {
            composite = a + (b - TBase);
            return true;
        }
        return Composition.TryGetValue(Key(a, b), out composite);
    }

    public static int CombiningClass(int cp)
    {
        var ranges = UnicodeNfcData.CombiningClasses;
        int lo = 0, hi = ranges.Length / 3 - 1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >> 1;
            if (cp < ranges[mid * 3]) hi = mid - 1;
            else if (cp > ranges[mid * 3 + 1]) lo = mid + 1;
            else return ranges[mid * 3 + 2];
        }
        return 0;
    }

    private static string ToString(List<int> cps)
    {
        var sb = new StringBuilder(cps.Count);
        foreach (var cp in cps) sb.Append(char.ConvertFromUtf32(cp));
        return sb.ToString();
    }

    private static long Key(int a, int b) => ((long)a << 21) | (uint)b;

    private static Dictionary<int, (int, int)> BuildDecomposition()
    {
        var data = UnicodeNfcData.Decompositions;
        var map = new Dictionary<int, (int, int)>(data.Length / 3);
        for (var i = 0; i < data.Length; i += 3) map[data[i]] = (data[i + 1], data[i + 2]);
        return map;
    }

    private static Dictionary<long, int> BuildComposition()
    {
        var excluded = UnicodeNfcData.NotRecomposed.ToHashSet();
        var data = UnicodeNfcData.Decompositions;
        var map = new Dictionary<long, int>();
        for (var i = 0; i < data.Length; i += 3)
            if (data[i + 2] >= 0 && !excluded.Contains(data[i]))
                map[Key(data[i + 1], data[i + 2])] = data[i];
        return map;
    }
}
