using System.Globalization;
using System.Security;
using System.Text;

namespace FineTune.Worker.Tools;

/// <summary>The comparison's markdown report: setup, the table, the plot, per-method settings and what the numbers say.</summary>
public static class CompareMarkdown
{
    public static string Write(CompareReport r, string? svgLink)
    {
        var sb = new StringBuilder();
        sb.Append("# Adapter methods at a matched trainable-parameter budget\n\n");
        sb.Append($"Generated {r.DateUtc} UTC on {r.Device} ({r.Machine}) by `{r.Command}` in {r.TotalSeconds:F0} s; ");
        sb.Append("`scripts/compare_methods.sh` rewrites this file and the plot.\n\n");
        sb.Append($"**Setup.** Model: {r.Model}, {r.ModelShape}. Data: {r.Data}. ");
        sb.Append($"Every method adapts all 7 linears of every layer, with the options whose trainable-parameter count (from the module shapes) ");
        sb.Append($"is closest to the budget of **{r.Budget:N0}** = bone r={r.BoneR} (the Bone paper pairs bone r=64 with LoRA r=32: equal counts on square modules). ");
        sb.Append($"All train through the worker's `Trainer` with the same seed ({r.Seed}), data order and schedule: {r.Steps} AdamW steps of {r.Batch} examples, ");
        sb.Append($"peak learning rate {Num(r.LearningRate)} (cosine, {r.WarmupSteps} warm-up steps), gradient clipping 1.0, no weight decay, maxSeqLength {r.Seq}. ");
        sb.Append($"Training loss is the mean of each {r.LogEvery}-step window; validation loss is over the held-out set every {r.EvalEvery} steps.");
        if (r.Note is { Length: > 0 } note) sb.Append(' ').Append(note);
        sb.Append("\n\n");

        sb.Append("| method | options | trainable | vs budget | final train loss | final val loss | best val loss (step) | tokens/s | wall s |\n");
        sb.Append("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
        foreach (var row in r.Rows)
        {
            if (row.Status != "ok")
            {
                sb.Append($"| {row.Label} | {Cell(row.Options)} | {(row.Trainable > 0 ? row.Trainable.ToString("N0", CultureInfo.InvariantCulture) : "")} | | {row.Status}: {Cell(row.Note)} | | | | |\n");
                continue;
            }
            var best = row.BestValidationLoss is { } b ? $"{b:F4} ({row.BestValidationStep})" : "-";
            sb.Append($"| {row.Label} | {Cell(row.Options)} | {row.Trainable.ToString("N0", CultureInfo.InvariantCulture)} | {CompareCommand.Relative(row.Trainable, r.Budget)} | ");
            sb.Append($"{Loss(row.FinalTrainLoss)} | {Loss(row.FinalValidationLoss)} | {best} | {Int(row.TokensPerSecond)} | {row.WallSeconds:F1} |\n");
        }
        sb.Append('\n');
        if (svgLink is not null) sb.Append($"![training and validation loss per method]({svgLink})\n\n");

        sb.Append("**Per-method settings.**\n\n");
        foreach (var row in r.Rows.Where(x => x.Settings.Length > 0))
            sb.Append($"- `{row.Label}` ({row.Type}): {row.Settings}{(row.Status == "ok" && row.Note.Length > 0 ? $"; {row.Note}" : "")}\n");
        sb.Append('\n');

        sb.Append("**What it shows.** ");
        sb.Append(Summary(r));
        sb.Append("\n\n");
        sb.Append("This is a synthetic task on a small model with random weights, one seed: it shows how fast each parametrisation fits new ");
        sb.Append("associations from scratch at this budget, through the service's own training loop. A random base has no pretrained features for ");
        sb.Append("an adapter to reuse, so rankings here need not transfer to real models and tasks; the Bone paper's results are on LLaMA2-7B ");
        sb.Append("and larger with MetaMathQA and code. In particular PiSSA and OLoRA start from W's principal directions, which in a random W ");
        sb.Append("are noise (and they train at s = 1 where LoRA has s = 2), and Bat's update W_b·D + D has a W-dependent term that the random ");
        sb.Append("base's small weights (N(0, 0.02²)) make small, so Bat is expected to track Bone here. One seed per method: gaps of a tenth of a nat ");
        sb.Append("or so may not survive another seed. Speed on a shared CPU is indicative only; on a GPU the ");
        sb.Append("same command with `--device cuda` (the 1b preset, a larger dataset and batch) gives the bigger version.\n");
        return sb.ToString();
    }

    private static string Summary(CompareReport r)
    {
        var ok = r.Trained.Where(x => x.BestValidationLoss is not null).OrderBy(x => x.BestValidationLoss).ToList();
        if (ok.Count == 0) return "No method finished, so there is nothing to compare.";
        var sb = new StringBuilder();
        sb.Append("By best validation loss: ");
        sb.Append(string.Join(", ", ok.Select(x => $"{x.Label} {x.BestValidationLoss:F3}")));
        sb.Append(". ");
        var byTrain = r.Trained.Where(x => x.FinalTrainLoss is { } l && double.IsFinite(l)).OrderBy(x => x.FinalTrainLoss).ToList();
        if (byTrain.Count > 0)
            sb.Append($"By final training loss: {string.Join(", ", byTrain.Select(x => $"{x.Label} {x.FinalTrainLoss:F3}"))}. ");
        var lora = ok.FirstOrDefault(x => x.Label == "lora");
        var bone = ok.FirstOrDefault(x => x.Label == "bone");
        if (lora is not null && bone is not null)
        {
            var d = (bone.BestValidationLoss!.Value - lora.BestValidationLoss!.Value) / lora.BestValidationLoss.Value * 100;
            sb.Append($"The paper's pairing, bone against LoRA at the same budget: best validation loss {bone.BestValidationLoss:F3} vs {lora.BestValidationLoss:F3} ");
            sb.Append($"({d.ToString("+0.0;-0.0;0.0", CultureInfo.InvariantCulture)} %), final training loss {Loss(bone.FinalTrainLoss)} vs {Loss(lora.FinalTrainLoss)}. ");
        }
        var still = ok.Where(x => x.BestValidationStep == r.Steps && x.Validation.Count >= 3 && x.Validation[^3].Loss - x.Validation[^1].Loss > 0.005)
            .Select(x => x.Label).ToList();
        if (still.Count > 0)
            sb.Append($"The validation loss of {string.Join(", ", still)} was still falling at the last step: the run compares how fast methods fit as much as where they end. ");
        // Curves that coincide hide each other in the plot (which shows the run from its first fifth on): say so.
        foreach (var (x, y) in ok.SelectMany((x, i) => ok.Skip(i + 1).Select(y => (x, y))))
            if (x.Validation.Count == y.Validation.Count && x.Validation.Zip(y.Validation)
                    .Where(p => p.First.Step >= r.Steps * 0.2).All(p => Math.Abs(p.First.Loss - p.Second.Loss) < 0.05))
                sb.Append($"{x.Label} and {y.Label} are within 0.05 of each other at every validation point after the first fifth of the run (their lines overlap). ");
        var overfit = ok.Where(x => x.FinalValidationLoss is { } f && f > x.BestValidationLoss!.Value * 1.02).Select(x => x.Label).ToList();
        if (overfit.Count > 0)
            sb.Append($"Validation loss rose again before the end (over-fitting the {r.Steps}-step run) for {string.Join(", ", overfit)}. ");
        return sb.ToString().TrimEnd();
    }

    private static string Cell(string s) => s.Replace("|", "\\|");
    private static string Loss(double? x) => x is { } v && double.IsFinite(v) ? v.ToString("F4", CultureInfo.InvariantCulture) : "-";
    private static string Int(double? x) => x is { } v && double.IsFinite(v) ? v.ToString("N0", CultureInfo.InvariantCulture) : "-";
    private static string Num(double x) => x.ToString("G4", CultureInfo.InvariantCulture);
}

/// <summary>
/// The loss curves as a hand-written SVG (no plotting library): two panels, training and validation loss against the
/// optimizer step, one colour (and, past ten methods, one dash pattern) per method, a shared legend. The y axis starts
/// where the curves have left their first steep drop (a fifth of the steps), so the differences that matter are not
/// squeezed flat; lines are clipped to the panel.
/// </summary>
public static class LossPlot
{
    private static readonly string[] Colors =
        ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
    private static readonly string[] Dashes = ["", "6 3", "2 2", "8 3 2 3"];

    private const double Width = 1200, PanelWidth = 500, PanelHeight = 360, Top = 90, Left = 80, Gap = 100, LegendColumn = 560;
    private const int LegendColumns = 2;

    public static string Svg(CompareReport r)
    {
        var rows = r.Trained.ToList();
        var legendRows = (rows.Count + LegendColumns - 1) / LegendColumns;
        var height = Top + PanelHeight + 60 + 24 * Math.Max(1, legendRows) + 20;
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{Width}\" height=\"{height}\" viewBox=\"0 0 {Width} {height}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"13\">\n");
        sb.Append("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Width / 2}\" y=\"28\" text-anchor=\"middle\" font-size=\"17\" font-weight=\"bold\">{Esc($"Adapter methods at {r.Budget:N0} trainable parameters (bone r={r.BoneR}), {r.Steps} steps")}</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Width / 2}\" y=\"50\" text-anchor=\"middle\" fill=\"#555\">{Esc($"{r.Model}: {r.ModelShape}; {r.Device}, seed {r.Seed}")}</text>\n");

        var xMax = Math.Max(1, r.Steps);
        Panel(sb, Left, "training loss (" + r.LogEvery + "-step window mean)", rows, x => x.Train, xMax, 0, markers: false);
        Panel(sb, Left + PanelWidth + Gap, "validation loss (held-out set)", rows, x => x.Validation, xMax, 1, markers: true);

        // Legend: two entries per row under the panels.
        var legendTop = Top + PanelHeight + 62;
        for (var i = 0; i < rows.Count; i++)
        {
            var x = Left - 20 + (i % LegendColumns) * LegendColumn;
            var y = legendTop + (i / LegendColumns) * 24;
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{x:F1}\" y1=\"{y:F1}\" x2=\"{x + 30:F1}\" y2=\"{y:F1}\" stroke=\"{Color(i)}\" stroke-width=\"{Stroke(rows[i]) + 0.5:F1}\"{Dash(i)}/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{x + 38:F1}\" y=\"{y + 4:F1}\">{Esc($"{rows[i].Label} ({rows[i].Options})")}</text>\n");
        }
        sb.Append("</svg>\n");
        return sb.ToString();
    }

    private static void Panel(StringBuilder sb, double left, string title, List<CompareRow> rows,
        Func<CompareRow, IReadOnlyList<CurvePoint>> curve, long xMax, int id, bool markers)
    {
        var all = rows.SelectMany(curve).Where(p => double.IsFinite(p.Loss)).ToList();
        var (yLo, yHi) = YRange(rows.Select(curve).ToList(), xMax);
        var (yTicks, yStep) = Ticks(yLo, yHi, 6);
        yLo = Math.Min(yLo, yTicks[0]);
        yHi = Math.Max(yHi, yTicks[^1]);
        var (xTicks, _) = Ticks(0, xMax, 8);
        double X(double step) => left + step / xMax * PanelWidth;
        double Y(double loss) => Top + (yHi - loss) / (yHi - yLo) * PanelHeight;

        sb.Append(CultureInfo.InvariantCulture, $"<g id=\"panel-{id}\">\n");
        sb.Append(CultureInfo.InvariantCulture, $"<defs><clipPath id=\"clip-{id}\"><rect x=\"{left:F1}\" y=\"{Top:F1}\" width=\"{PanelWidth:F1}\" height=\"{PanelHeight:F1}\"/></clipPath></defs>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{left + PanelWidth / 2:F1}\" y=\"{Top - 10:F1}\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{Esc(title)}</text>\n");
        // Grid, ticks and labels.
        foreach (var t in yTicks.Where(t => t >= yLo - 1e-12 && t <= yHi + 1e-12))
        {
            var y = Y(t);
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{left:F1}\" y1=\"{y:F1}\" x2=\"{left + PanelWidth:F1}\" y2=\"{y:F1}\" stroke=\"#e5e5e5\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{left - 5:F1}\" y1=\"{y:F1}\" x2=\"{left:F1}\" y2=\"{y:F1}\" stroke=\"black\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{left - 8:F1}\" y=\"{y + 4:F1}\" text-anchor=\"end\">{Label(t, yStep)}</text>\n");
        }
        foreach (var t in xTicks.Where(t => t <= xMax))
        {
            var x = X(t);
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{x:F1}\" y1=\"{Top:F1}\" x2=\"{x:F1}\" y2=\"{Top + PanelHeight:F1}\" stroke=\"#f0f0f0\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{x:F1}\" y1=\"{Top + PanelHeight:F1}\" x2=\"{x:F1}\" y2=\"{Top + PanelHeight + 5:F1}\" stroke=\"black\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{x:F1}\" y=\"{Top + PanelHeight + 20:F1}\" text-anchor=\"middle\">{t:0}</text>\n");
        }
        sb.Append(CultureInfo.InvariantCulture, $"<rect x=\"{left:F1}\" y=\"{Top:F1}\" width=\"{PanelWidth:F1}\" height=\"{PanelHeight:F1}\" fill=\"none\" stroke=\"black\"/>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{left + PanelWidth / 2:F1}\" y=\"{Top + PanelHeight + 40:F1}\" text-anchor=\"middle\">optimizer step</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text transform=\"translate({left - 50:F1},{Top + PanelHeight / 2:F1}) rotate(-90)\" text-anchor=\"middle\">loss (nats per token)</text>\n");
        if (all.Count == 0)
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{left + PanelWidth / 2:F1}\" y=\"{Top + PanelHeight / 2:F1}\" text-anchor=\"middle\" fill=\"#888\">no data</text>\n");

        sb.Append(CultureInfo.InvariantCulture, $"<g clip-path=\"url(#clip-{id})\" fill=\"none\">\n");
        // The emphasised lines last, so that no other method's line hides them.
        foreach (var i in Enumerable.Range(0, rows.Count).OrderBy(i => Stroke(rows[i])))
        {
            var points = curve(rows[i]).Where(p => double.IsFinite(p.Loss)).ToList();
            if (points.Count == 0) continue;
            var path = string.Join(' ', points.Select(p => string.Create(CultureInfo.InvariantCulture, $"{X(p.Step):F1},{Y(p.Loss):F1}")));
            sb.Append(CultureInfo.InvariantCulture, $"<polyline data-method=\"{Esc(rows[i].Label)}\" points=\"{path}\" stroke=\"{Color(i)}\" stroke-width=\"{Stroke(rows[i]):F1}\"{Dash(i)}/>\n");
            if (markers)
                foreach (var p in points)
                    sb.Append(CultureInfo.InvariantCulture, $"<circle cx=\"{X(p.Step):F1}\" cy=\"{Y(p.Loss):F1}\" r=\"2.5\" fill=\"{Color(i)}\"/>\n");
        }
        sb.Append("</g>\n</g>\n");
    }

    /// <summary>From the lowest point to the highest point any curve has once a fifth of the steps are done (the first
    /// drop, from the untrained loss, leaves the panel at the top), padded by 4 %.</summary>
    private static (double Lo, double Hi) YRange(List<IReadOnlyList<CurvePoint>> curves, long xMax)
    {
        var finite = curves.Select(c => c.Where(p => double.IsFinite(p.Loss)).ToList()).Where(c => c.Count > 0).ToList();
        if (finite.Count == 0) return (0, 1);
        var lo = finite.Min(c => c.Min(p => p.Loss));
        var hi = finite.Max(c => (c.FirstOrDefault(p => p.Step >= xMax * 0.2) ?? c[^1]).Loss);
        hi = Math.Max(hi, finite.Max(c => c[^1].Loss));
        if (hi - lo < 1e-6) (lo, hi) = (lo - 0.5, hi + 0.5);
        var pad = (hi - lo) * 0.04;
        return (Math.Max(0, lo - pad), hi + pad);
    }

    /// <summary>"Nice" ticks (1, 2, 2.5, 5 × 10^k) covering [lo, hi] with about <paramref name="count"/> intervals.</summary>
    public static (double[] Ticks, double Step) Ticks(double lo, double hi, int count)
    {
        var raw = (hi - lo) / count;
        var mag = Math.Pow(10, Math.Floor(Math.Log10(raw)));
        var step = new[] { 1, 2, 2.5, 5, 10 }.Select(m => m * mag).First(s => s >= raw);
        var first = Math.Floor(lo / step) * step;
        var ticks = new List<double>();
        for (var t = first; t <= hi + step * 0.5; t += step) ticks.Add(Math.Round(t / step) * step);
        return (ticks.ToArray(), step);
    }

    private static string Label(double t, double step)
    {
        var decimals = Math.Max(0, (int)Math.Ceiling(-Math.Log10(step) + 1e-9));
        if (step * Math.Pow(10, decimals) % 1 > 1e-6) decimals++;   // 2.5-steps need one more digit
        return t.ToString("F" + decimals, CultureInfo.InvariantCulture);
    }

    /// <summary>The paper's pairing, LoRA and bone, drawn heavier.</summary>
    private static double Stroke(CompareRow row) => row.Label is "lora" or "bone" ? 3 : 1.6;
    private static string Color(int i) => Colors[i % Colors.Length];
    private static string Dash(int i) => Dashes[i / Colors.Length % Dashes.Length] is { Length: > 0 } d ? $" stroke-dasharray=\"{d}\"" : "";
    private static string Esc(string s) => SecurityElement.Escape(s);
}
