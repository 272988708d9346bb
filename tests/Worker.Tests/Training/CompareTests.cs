using System.Globalization;
using System.Text.Json;
using System.Xml.Linq;
using FineTune.Domain.Methods;
using FineTune.Worker.Tools;

namespace FineTune.Worker.Tests.Training;

/// <summary>Smoke test of <c>FineTune.Worker bench compare</c> (a few steps, tiny preset, two methods) and of its budget
/// matching. No timing is asserted.</summary>
[Collection(GlobalGeneratorCollection.Name)]
public sealed class CompareTests
{
    [Fact]
    public async Task Compare_trains_two_methods_and_writes_a_table_and_a_well_formed_svg()
    {
        var dir = TestData.TempDir("compare");
        string md = Path.Combine(dir, "docs", "cmp.md"), svg = Path.Combine(dir, "docs", "cmp.svg"), json = Path.Combine(dir, "cmp.json");
        var rc = await CompareCommand.RunAsync([
            "--device", TestData.Device.ToString(), "--preset", "tiny", "--methods", "lora,bone", "--steps", "4", "--batch", "4",
            "--log-every", "1", "--eval-every", "2", "--md", md, "--svg", svg, "--json", json, "--work", Path.Combine(dir, "work"),
        ]);
        Assert.Equal(0, rc);

        var report = JsonSerializer.Deserialize<CompareReport>(File.ReadAllText(json))!;
        var rows = report.Rows.ToDictionary(r => r.Label);
        Assert.Equal(new[] { "lora", "bone" }, rows.Keys);
        foreach (var r in rows.Values)
        {
            Assert.Equal("ok", r.Status);
            Assert.Equal(new[] { 1L, 2, 3, 4 }, r.Train.Select(p => p.Step));
            Assert.Equal(new[] { 2L, 4 }, r.Validation.Select(p => p.Step));
            Assert.All(r.Train.Concat(r.Validation), p => Assert.InRange(p.Loss, 0.01, 30));
            Assert.Equal(r.Trainable, r.TrainableAttached);   // the formulas count what the attached method trains
        }
        // Tiny preset, bone r=16 on all 7 linears; LoRA r=8 has the same count on these shapes (the paper's pairing).
        Assert.Equal(16, report.BoneR);
        Assert.Equal(report.Budget, rows["bone"].Trainable);
        Assert.Equal(report.Budget, rows["lora"].Trainable);
        Assert.Equal("r=8, alpha=16", rows["lora"].Options);

        var table = File.ReadAllText(md);
        Assert.Contains("| method | options | trainable | vs budget | final train loss | final val loss | best val loss (step) | tokens/s | wall s |", table);
        var loraLine = table.Split('\n').Single(l => l.StartsWith("| lora |", StringComparison.Ordinal));
        Assert.Equal(10, loraLine.Split('|').Length - 1);   // 9 cells
        Assert.Contains(rows["lora"].FinalValidationLoss!.Value.ToString("F4", CultureInfo.InvariantCulture), loraLine);
        Assert.Contains("![training and validation loss per method](cmp.svg)", table);

        var doc = XDocument.Load(svg);
        XNamespace ns = "http://www.w3.org/2000/svg";
        Assert.Equal(ns + "svg", doc.Root!.Name);
        var viewBox = doc.Root.Attribute("viewBox")!.Value.Split(' ').Select(v => double.Parse(v, CultureInfo.InvariantCulture)).ToArray();
        var panels = doc.Root.Elements(ns + "g").ToList();
        Assert.Equal(new[] { "panel-0", "panel-1" }, panels.Select(p => (string)p.Attribute("id")!));
        foreach (var (panel, count) in panels.Zip(new[] { 4, 2 }))
        {
            var lines = panel.Descendants(ns + "polyline").ToList();
            Assert.Equal(new[] { "lora", "bone" }, lines.Select(l => (string)l.Attribute("data-method")!));
            foreach (var line in lines)
            {
                var points = line.Attribute("points")!.Value.Split(' ')
                    .Select(p => p.Split(',').Select(v => double.Parse(v, CultureInfo.InvariantCulture)).ToArray()).ToList();
                Assert.Equal(count, points.Count);
                Assert.All(points, p => Assert.InRange(p[0], 0, viewBox[2]));
            }
            Assert.True(panel.Descendants(ns + "text").Count() > 6, "axis tick labels");
        }
        Assert.Contains(doc.Root.Elements(ns + "text"), t => t.Value.StartsWith("lora (r=8", StringComparison.Ordinal));   // legend

        // The JSON holds everything: redrawn from it (as from a GPU host's run), the table and the plot are the same.
        string md2 = Path.Combine(dir, "again", "cmp.md"), svg2 = Path.Combine(dir, "again", "cmp.svg");
        Assert.Equal(0, await CompareCommand.RunAsync(["--from-json", json, "--md", md2, "--svg", svg2]));
        Assert.Equal(table, File.ReadAllText(md2));
        Assert.Equal(File.ReadAllText(svg), File.ReadAllText(svg2));
    }

    [Fact]
    public void Every_method_is_fitted_to_the_budget_with_its_closest_option()
    {
        foreach (var preset in new[] { "tiny", "small", "1b" })
        {
            var config = BenchModels.Preset(preset);
            var boneR = CompareMethods.DefaultBoneR(config);
            var budget = CompareMethods.Budget(config, boneR);
            var context = new CompareContext(boneR, Steps: 100);
            foreach (var v in CompareMethods.Variants)
            {
                var plan = CompareMethods.Plan(v, config, budget, context);
                Assert.True(plan.Spec is not null, $"{preset} {v.Label}: {plan.SkipReason}");
                Assert.Equal(plan.Trainable, plan.Spec!.TotalTrainableParameters(config));
                Assert.True(Math.Abs(plan.Trainable - budget) <= budget * 0.1, $"{preset} {v.Label}: {plan.Trainable} vs {budget}");
                Assert.Empty(plan.Spec.ValidateShapes(config.LayerLinears()));
            }
        }
        // Llama-3.2-1B shapes: bone r=64 (the paper's); LoRA's closest rank on these non-square modules is 34, not 32.
        var oneB = BenchModels.Preset("1b");
        Assert.Equal(64, CompareMethods.DefaultBoneR(oneB));
        var lora = (LoraMethod)CompareMethods.Plan(CompareMethods.Variants.Single(v => v.Label == "lora"), oneB,
            CompareMethods.Budget(oneB, 64), new CompareContext(64, 100)).Spec!;
        Assert.Equal(34, lora.R);
        var budget1b = CompareMethods.Budget(oneB, 64);
        long Count(int r) => (lora with { R = r }).TotalTrainableParameters(oneB);
        Assert.True(Math.Abs(Count(34) - budget1b) < Math.Abs(Count(33) - budget1b) && Math.Abs(Count(34) - budget1b) < Math.Abs(Count(35) - budget1b));
    }

    [Fact]
    public void A_method_whose_closest_option_is_far_off_the_budget_is_skipped_with_the_reason()
    {
        // Sizes 98 and 262 share only the divisor 2: Bat's r can be at most 2 against bone r=8.
        var config = BenchModels.Preset("tiny") with { HiddenSize = 98, IntermediateSize = 262, NumAttentionHeads = 2, NumKeyValueHeads = 2 };
        var budget = CompareMethods.Budget(config, 8);
        var context = new CompareContext(8, 100);
        var bat = CompareMethods.Plan(CompareMethods.Variants.Single(v => v.Label == "bat"), config, budget, context);
        Assert.Null(bat.Spec);
        Assert.Contains("r=2, col", bat.SkipReason);
        Assert.Contains("-75.0%", bat.SkipReason);
        var lora = CompareMethods.Plan(CompareMethods.Variants.Single(v => v.Label == "lora"), config, budget, context);
        Assert.NotNull(lora.Spec);
    }

    [Fact]
    public void The_dataset_is_deterministic_and_its_validation_is_held_out()
    {
        var a = CompareData.Build(7);
        var b = CompareData.Build(7);
        Assert.Equal(a.Train, b.Train);
        Assert.Equal(a.Validation, b.Validation);
        Assert.NotEqual(a.Train, CompareData.Build(8).Train);
        Assert.Equal(736, a.Train.Count);
        Assert.Equal(96, a.Validation.Count);
        var trained = a.Train.Select(e => e.Prompt).ToHashSet();
        Assert.DoesNotContain(a.Validation, e => trained.Contains(e.Prompt));
        // A held-out phrasing of a fact: its person is trained in the other phrasings, with the same city.
        var fact = a.Validation.First(e => e.Prompt!.StartsWith("Where does ", StringComparison.Ordinal) || e.Prompt.EndsWith(" lives in ", StringComparison.Ordinal));
        var person = fact.Prompt!.StartsWith("Where does ", StringComparison.Ordinal) ? fact.Prompt[11..^7] : fact.Prompt[..^10];
        var same = a.Train.Where(e => e.Prompt!.Contains(person + " ", StringComparison.Ordinal) || e.Prompt.Contains(person + "'s", StringComparison.Ordinal) || e.Prompt.EndsWith(person + ": ", StringComparison.Ordinal)).ToList();
        Assert.Equal(3, same.Count);
        Assert.All(same, e => Assert.Equal(fact.Completion, e.Completion));
    }

    [Fact]
    public async Task Bad_options_are_a_usage_error()
    {
        Assert.Equal(2, await CompareCommand.RunAsync(["--methods", "lora,nosuch"]));
        Assert.Equal(2, await CompareCommand.RunAsync(["--steps", "0"]));
        Assert.Equal(2, await CompareCommand.RunAsync(["--preset", "tiny", "--model", "/x"]));
        Assert.Equal(2, await CompareCommand.RunAsync(["--steps"]));
    }
}
