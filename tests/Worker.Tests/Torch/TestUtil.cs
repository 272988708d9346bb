using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Torch;

/// <summary>Tests that measure process-wide state (RSS, live tensors) run alone, after the parallel ones.</summary>
[CollectionDefinition("TorchSerial", DisableParallelization = true)]
public sealed class TorchSerialCollection;

internal static class TestUtil
{
    /// <summary>Central finite differences of a scalar function vs autograd, in float64.</summary>
    public static void CheckGradients(Func<Tensor[], Tensor> f, params (double[] Data, long[] Shape)[] inputs)
    {
        using var scope = DisposeScope.Begin();
        var leaves = inputs.Select(i => Tensor.From(i.Data, i.Shape).RequiresGrad_()).ToArray();
        f(leaves).Backward();
        const double h = 1e-6;
        for (var k = 0; k < inputs.Length; k++)
        {
            var analytic = leaves[k].Grad!.ToArray<double>();
            for (var j = 0; j < inputs[k].Data.Length; j++)
            {
                double Eval(double delta)
                {
                    using var inner = DisposeScope.Begin();
                    var args = inputs.Select((inp, idx) =>
                    {
                        var d = (double[])inp.Data.Clone();
                        if (idx == k) d[j] += delta;
                        return Tensor.From(d, inp.Shape);
                    }).ToArray();
                    return f(args).ItemDouble();
                }
                var numeric = (Eval(h) - Eval(-h)) / (2 * h);
                Assert.True(Math.Abs(numeric - analytic[j]) <= 1e-6 + 1e-5 * Math.Abs(numeric),
                    $"input {k} element {j}: autograd {analytic[j]:R} vs finite difference {numeric:R}");
            }
        }
    }

    public static double[] RandomData(int n, int seed, double scale = 1.0)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (rng.NextDouble() * 2 - 1) * scale).ToArray();
    }

    public static long RssBytes()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        throw new InvalidOperationException("VmRSS not found");
    }
}

/// <summary>A small dense layer for the tests (the training code has its own modules).</summary>
internal sealed class TestLinear : Module
{
    public TestLinear(long inFeatures, long outFeatures, Generator gen, bool bias = true, ScalarType dtype = ScalarType.Float32)
    {
        var bound = 1.0 / Math.Sqrt(inFeatures);
        using var scope = DisposeScope.Begin();
        Weight = RegisterParameter("weight", Tensor.Empty([outFeatures, inFeatures], dtype).Uniform_(-bound, bound, gen));
        Bias = bias ? RegisterParameter("bias", Tensor.Zeros([outFeatures], dtype)) : null;
    }

    public Tensor Weight { get; }
    public Tensor? Bias { get; }
    public Tensor Forward(Tensor x) => F.Linear(x, Weight, Bias);
}
