using FineTune.Domain.Datasets;
using FineTune.Worker.Training.Data;

namespace FineTune.Worker.Tools;

/// <summary>
/// The method comparison's dataset: prompt/completion pairs from three small tasks with something to learn and a
/// held-out validation set that can only be predicted by what was learned, not by memorising lines:
/// <list type="bullet">
/// <item><b>facts</b>: invented people, each living in one of 16 cities, asked four ways ("Where does Kavomer live?",
/// "Kavomer lives in", …). Validation holds out one phrasing of some people whose other three phrasings are trained:
/// it measures whether a fact learned in some words is recalled in others.</item>
/// <item><b>sums</b>: "37+45=" → "82" on pairs below 50; validation pairs are never trained.</item>
/// <item><b>reversal</b>: "reverse kqzt:" → "tzqk" on random 4-letter words; validation words are never trained.</item>
/// </list>
/// A pure function of the seed (SplitMix64 draws), so every method sees the same examples in the same order.
/// </summary>
public static class CompareData
{
    private static readonly string[] Cities =
    [
        "Paris", "Lima", "Oslo", "Rome", "Cairo", "Tokyo", "Quito", "Dakar",
        "Hanoi", "Sofia", "Riga", "Perth", "Lagos", "Minsk", "Seoul", "Bern",
    ];

    private static readonly string[] FactTemplates = ["Where does {0} live? ", "{0} lives in ", "Home of {0}: ", "{0}'s city is "];

    public sealed record Set(List<DatasetExample> Train, List<DatasetExample> Validation, string Description);

    /// <param name="scale">Multiplies every task's size (1: 736 training and 96 validation examples).</param>
    public static Set Build(long seed, int scale = 1)
    {
        if (scale is < 1 or > 64) throw new ArgumentOutOfRangeException(nameof(scale), "must be between 1 and 64");
        var state = (ulong)seed ^ 0xC0FFEE1234567UL;
        int Next(int n) => (int)((TrainingData.SplitMix64(ref state) >> 33) % (ulong)n);
        var train = new List<DatasetExample>();
        var validation = new List<DatasetExample>();
        void Add(List<DatasetExample> to, string prompt, string completion) =>
            to.Add(new DatasetExample(train.Count + validation.Count + 1, prompt, completion));

        // facts: 64 people × 4 phrasings; half of the people have one phrasing held out.
        var people = 64 * scale;
        var names = new HashSet<string>();
        while (names.Count < people) names.Add(Name(Next));
        var p = 0;
        foreach (var name in names)
        {
            var city = Cities[Next(Cities.Length)];
            var heldOut = p++ % 2 == 0 ? Next(FactTemplates.Length) : -1;
            for (var t = 0; t < FactTemplates.Length; t++)
                Add(t == heldOut ? validation : train, string.Format(FactTemplates[t], name), city);
        }

        // sums: a + b with a, b < 50 (2500 pairs); validation pairs are disjoint from training pairs.
        var sums = 32 * scale * 9;
        var pairs = new HashSet<(int, int)>();
        while (pairs.Count < Math.Min(sums, 2500)) pairs.Add((Next(50), Next(50)));
        var i = 0;
        foreach (var (a, b) in pairs) Add(i++ % 9 == 0 ? validation : train, $"{a}+{b}=", $"{a + b}");

        // reversal of random 4-letter words; validation words are not trained.
        var words = new HashSet<string>();
        while (words.Count < 32 * scale * 9)
            words.Add(new string(Enumerable.Range(0, 4).Select(_ => (char)('a' + Next(26))).ToArray()));
        i = 0;
        foreach (var w in words) Add(i++ % 9 == 0 ? validation : train, $"reverse {w}: ", new string(w.Reverse().ToArray()));

        // One shuffled file order, so a batch mixes the tasks (the trainer shuffles again per epoch with its seed).
        Shuffle(train, Next);
        var description = $"{train.Count} training and {validation.Count} validation prompt/completion pairs (loss on the completion): " +
            $"recall of {people} invented facts asked in a held-out phrasing, two-digit sums of unseen pairs, reversal of unseen 4-letter words";
        return new Set(train, validation, description);
    }

    private static string Name(Func<int, int> next)
    {
        const string consonants = "bdfgklmnprstvz", vowels = "aeiou";
        var syllables = 2 + next(2);
        var chars = new List<char>();
        for (var s = 0; s < syllables; s++)
        {
            chars.Add(consonants[next(consonants.Length)]);
            chars.Add(vowels[next(vowels.Length)]);
        }
        if (next(2) == 0) chars.Add(consonants[next(consonants.Length)]);
        chars[0] = char.ToUpperInvariant(chars[0]);
        return new string(chars.ToArray());
    }

    private static void Shuffle<T>(List<T> list, Func<int, int> next)
    {
        for (var k = list.Count - 1; k > 0; k--)
        {
            var j = next(k + 1);
            (list[k], list[j]) = (list[j], list[k]);
        }
    }
}
