using System.Text.Json;

namespace FineTune.Worker;

/// <summary>
/// A small prompt/completion dataset for the demo: capitals of countries, asked several ways. A tiny model can
/// memorise it in a few hundred steps on a CPU, which makes the falling loss easy to see.
/// </summary>
public static class SampleData
{
    private static readonly (string Country, string Capital)[] Capitals =
    [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
        ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
        ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Chile", "Santiago"), ("Cuba", "Havana"),
        ("Austria", "Vienna"),
    ];

    private static readonly string[] Templates =
    [
        "What is the capital of {0}?", "Capital of {0}:", "Name the capital city of {0}.", "{0}'s capital is",
    ];

    public static void Write(string path)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        using var writer = new StreamWriter(path);
        foreach (var template in Templates)
        foreach (var (country, capital) in Capitals)
            writer.WriteLine(JsonSerializer.Serialize(new { prompt = string.Format(template, country) + " ", completion = capital }));
    }
}
