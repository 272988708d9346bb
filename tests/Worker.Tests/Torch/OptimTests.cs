using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;

namespace FineTune.Worker.Tests.Torch;

public sealed class OptimTests
{
    /// <summary>AdamW by the book (decoupled decay, bias correction), in plain doubles.</summary>
    private sealed class Reference(double[] p, double lr, double wd)
    {
        public readonly double[] P = (double[])p.Clone();
        private readonly double[] _m = new double[p.Length], _v = new double[p.Length];
        public void Step(double[] g, int t, double b1 = 0.9, double b2 = 0.999, double eps = 1e-8)
        {
            for (var i = 0; i < P.Length; i++)
            {
                P[i] *= 1 - lr * wd;
                _m[i] = b1 * _m[i] + (1 - b1) * g[i];
                _v[i] = b2 * _v[i] + (1 - b2) * g[i] * g[i];
                var mhat = _m[i] / (1 - Math.Pow(b1, t));
                var vhat = _v[i] / (1 - Math.Pow(b2, t));
                P[i] -= lr * mhat / (Math.Sqrt(vhat) + eps);
            }
        }
    }

    private static void SetGrad(Tensor p, double[] g)
    {
        // grad of sum(p * g) w.r.t. p is g
        using var scope = DisposeScope.Begin();
        (p * Tensor.From(g, p.Shape)).Sum().Backward();
    }

    [Fact]
    public void AdamWMatchesHandComputedUpdatesAndResumesFromStateDict()
    {
        double[] a0 = [0.5, -1.0, 2.0], b0 = [1.0, 0.25];
        double[][] ga = [[0.1, -0.2, 0.3], [-0.5, 0.4, 0.05], [0.2, 0.2, -0.1]];
        double[][] gb = [[1.0, -2.0], [0.5, 0.5], [-1.0, 0.3]];
        using var a = DisposeScope.Keep(Tensor.From(a0).RequiresGrad_());
        using var b = DisposeScope.Keep(Tensor.From(b0).RequiresGrad_());
        var refA = new Reference(a0, 0.1, 0.05);
        var refB = new Reference(b0, 0.01, 0.0);
        using var opt = new AdamW([new ParamGroup("a", [a], 0.1, 0.05), new ParamGroup("b", [b], 0.01)]);
        for (var t = 1; t <= 2; t++)
        {
            SetGrad(a, ga[t - 1]);
            SetGrad(b, gb[t - 1]);
            opt.Step();
            opt.ZeroGrad();
            Assert.Null(a.Grad);
            refA.Step(ga[t - 1], t);
            refB.Step(gb[t - 1], t);
            AssertClose(refA.P, a.ToArray<double>());
            AssertClose(refB.P, b.ToArray<double>());
        }
        Assert.Equal(2, opt.StepCount);

        // A fresh optimizer loaded from the state dict continues exactly like the original.
        using var scope = DisposeScope.Begin();
        var state = opt.StateDict();
        Assert.Contains("g0.p0.exp_avg", state.Keys);
        Assert.Contains("g1.p0.exp_avg_sq", state.Keys);
        Assert.Equal(2, state["step"].ItemLong());
        using var a2 = DisposeScope.Keep(a.Detach().Clone().RequiresGrad_());
        using var b2 = DisposeScope.Keep(b.Detach().Clone().RequiresGrad_());
        using var opt2 = new AdamW([new ParamGroup("a", [a2], 0.1, 0.05), new ParamGroup("b", [b2], 0.01)]);
        opt2.LoadStateDict(state);
        Assert.Equal(2, opt2.StepCount);
        SetGrad(a, ga[2]); SetGrad(b, gb[2]); opt.Step();
        SetGrad(a2, ga[2]); SetGrad(b2, gb[2]); opt2.Step();
        refA.Step(ga[2], 3);
        Assert.Equal(a.ToArray<double>(), a2.ToArray<double>());
        Assert.Equal(b.ToArray<double>(), b2.ToArray<double>());
        AssertClose(refA.P, a2.ToArray<double>());
    }

    [Fact]
    public void AdamWSkipsParametersWithoutGradAndRejectsBadState()
    {
        using var scope = DisposeScope.Begin();
        var p = Tensor.From(new double[] { 1, 2 }).RequiresGrad_();
        using var opt = new AdamW([new ParamGroup("g", [p], 0.1, 0.1)]);
        opt.Step();
        Assert.Equal([1.0, 2.0], p.ToArray<double>());
        var ex = Assert.Throws<InvalidOperationException>(() => opt.LoadStateDict(new Dictionary<string, Tensor> { ["step"] = Tensor.Scalar(1, ScalarType.Int64) }));
        Assert.Contains("g0.p0.exp_avg", ex.Message);
    }

    [Fact]
    public void SgdWithMomentum()
    {
        using var scope = DisposeScope.Begin();
        var p = Tensor.From(new double[] { 1.0 }).RequiresGrad_();
        using var opt = new Sgd([new ParamGroup("g", [p], 0.1)], momentum: 0.9);
        SetGrad(p, [1.0]); opt.Step(); opt.ZeroGrad();
        Assert.Equal(0.9, p.ToArray<double>()[0], 12);
        SetGrad(p, [1.0]); opt.Step(); opt.ZeroGrad();
        Assert.Equal(0.9 - 0.1 * 1.9, p.ToArray<double>()[0], 12);
        opt.SetLearningRateFactor(0.5);
        SetGrad(p, [1.0]); opt.Step();
        Assert.Equal(0.9 - 0.1 * 1.9 - 0.05 * (1.9 * 0.9 + 1), p.ToArray<double>()[0], 12);
    }

    [Fact]
    public void ClipGradNormReturnsTheGlobalNormAndScales()
    {
        using var scope = DisposeScope.Begin();
        var a = Tensor.From(new double[] { 1, 1 }).RequiresGrad_();
        var b = Tensor.From(new double[] { 1 }).RequiresGrad_();
        var c = Tensor.From(new double[] { 5 }).RequiresGrad_(); // no grad: ignored
        SetGrad(a, [3, 4]);
        SetGrad(b, [12]);
        var norm = GradClip.ClipGradNorm([a, b, c], 6.5);
        Assert.Equal(13.0, norm, 9);
        var ga = a.Grad!.ToArray<double>();
        Assert.Equal(3 * 6.5 / 13, ga[0], 5);
        Assert.Equal(4 * 6.5 / 13, ga[1], 5);
        Assert.Equal(12 * 6.5 / 13, b.Grad!.ToArray<double>()[0], 5);
        // Below the limit nothing changes.
        var norm2 = GradClip.ClipGradNorm([a, b], 100);
        Assert.Equal(6.5, norm2, 4);
        Assert.Equal(3 * 6.5 / 13, a.Grad!.ToArray<double>()[0], 5);
    }

    [Fact]
    public void LrScheduleValues()
    {
        Assert.Equal(0.0, LrSchedule.Factor("linear", 0, 110, 10));
        Assert.Equal(0.5, LrSchedule.Factor("cosine", 5, 110, 10), 12);
        Assert.Equal(1.0, LrSchedule.Factor("constant", 10, 110, 10));
        Assert.Equal(1.0, LrSchedule.Factor("constant", 100, 110, 10));
        Assert.Equal(1.0, LrSchedule.Factor("linear", 10, 110, 10), 12);
        Assert.Equal(0.5, LrSchedule.Factor("linear", 60, 110, 10), 12);
        Assert.Equal(0.0, LrSchedule.Factor("linear", 110, 110, 10), 12);
        Assert.Equal(0.5, LrSchedule.Factor("cosine", 60, 110, 10), 12);
        Assert.Equal(0.5 * (1 + Math.Cos(Math.PI * 0.25)), LrSchedule.Factor("cosine", 35, 110, 10), 12);
        Assert.Equal(0.1, LrSchedule.Factor("cosine", 110, 110, 10, 0.1), 12);
        Assert.Equal(0.55, LrSchedule.Factor("linear", 60, 110, 10, 0.1), 12);
        Assert.Equal(1.0, LrSchedule.Factor("cosine", 0, 100, 0), 12);
        Assert.Throws<ArgumentException>(() => LrSchedule.Factor("step", 1, 10, 0));
    }

    private static void AssertClose(double[] expected, double[] actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (var i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(expected[i] - actual[i]) < 1e-12, $"element {i}: expected {expected[i]:R}, got {actual[i]:R}");
    }
}
