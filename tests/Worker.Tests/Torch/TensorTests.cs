using TorchApi = FineTune.Worker.Torch.Torch;
using System.Diagnostics;
using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Torch;

[Collection(GlobalGeneratorCollection.Name)]
public sealed class TensorTests
{
    [Fact]
    public void GlobalsAndDevices()
    {
        Assert.StartsWith(Environment.GetEnvironmentVariable("FINETUNE_EXPECT_TORCH") ?? "", TorchApi.Version);
        Assert.Matches(@"^\d+\.\d+", TorchApi.Version);
        Assert.True(TorchApi.NumThreads >= 1);
        Assert.True(TorchApi.IsGradEnabled);
        using (TorchApi.NoGrad())
        {
            Assert.False(TorchApi.IsGradEnabled);
            using var scope = DisposeScope.Begin();
            var p = Tensor.Ones([2], requiresGrad: true);
            Assert.False((p * 2).RequiresGrad);
        }
        Assert.True(TorchApi.IsGradEnabled);
        Assert.Equal(Device.Cuda(1), Device.Parse("cuda:1"));
        Assert.Equal(Device.Cuda(0), Device.Parse("cuda"));
        Assert.Equal(Device.Cpu, Device.Parse("CPU"));
        Assert.Equal("cuda:2", Device.Cuda(2).ToString());
        Assert.Throws<FormatException>(() => Device.Parse("tpu"));
        Assert.Equal(Cuda.IsAvailable(), Cuda.DeviceCount() > 0);
        if (!Cuda.IsAvailable()) Assert.Equal(0, Cuda.MaxMemoryAllocated());
        Cuda.Synchronize();
    }

    [Fact]
    public void CreationInfoAndReadBack()
    {
        using var scope = DisposeScope.Begin();
        var t = Tensor.From(new float[] { 1, 2, 3, 4, 5, 6 }, 2, 3);
        Assert.Equal([2L, 3], t.Shape);
        Assert.Equal(2, t.Dim);
        Assert.Equal(6, t.NumEl);
        Assert.Equal(3, t.Size(-1));
        Assert.Equal(ScalarType.Float32, t.DType);
        Assert.Equal(Device.Cpu, t.Device);
        Assert.Equal(4, t.ElementSize);
        Assert.True(t.IsContiguous);
        Assert.False(t.T().IsContiguous);
        Assert.True(t.IsLeaf);
        Assert.Equal("Tensor([2, 3], Float32, cpu)", t.ToString());
        Assert.Equal([1f, 4, 2, 5, 3, 6], t.T().ToArray<float>());
        Assert.Equal([3L], Tensor.From(new long[] { 1, 2, 3 }).Shape);
        Assert.Equal([true, false], Tensor.From(new[] { true, false }).ToArray<bool>());
        Assert.Equal([7, 8], Tensor.From(new[] { 7, 8 }).ToArray<int>());
        Assert.Equal([1, 255], Tensor.From(new byte[] { 1, 255 }).ToArray<byte>());
        Assert.Equal((Half)1.5, Tensor.From<Half>([(Half)1.5], [1]).ToArray<Half>()[0]);
        var bf = Tensor.FromBytes([0x80, 0x3f, 0x00, 0x40], ScalarType.BFloat16, [2]);
        Assert.Equal([1f, 2f], bf.To(ScalarType.Float32).ToArray<float>());
        Assert.Equal([0x80, 0x3f, 0x00, 0x40], bf.ToBytes());
        Assert.Equal(2.5f, Tensor.Scalar(2.5).ItemFloat());
        Assert.Equal(3L, Tensor.Scalar(3, ScalarType.Int64).ItemLong());
        Assert.True(Tensor.Scalar(1, ScalarType.Bool).ItemBool());
        Assert.Equal([0L, 1, 2], Tensor.Arange(3).ToArray<long>());
        Assert.Equal([0.5f, 1.0f, 1.5f], Tensor.Arange(0.5, 2, 0.5).ToArray<float>());
        Assert.Equal([7.0, 7.0], Tensor.Full([2], 7, ScalarType.Float64).ToArray<double>());
        Assert.Equal([0f, 0f], Tensor.ZerosLike(Tensor.Ones([2])).ToArray<float>());
        Assert.Equal([1L, 1L], Tensor.OnesLike(Tensor.Zeros([2], ScalarType.Int64)).ToArray<long>());
        Assert.Equal(ScalarType.BFloat16, Tensor.Empty([3], ScalarType.BFloat16).DType);
        var p = Tensor.Zeros([2], requiresGrad: true);
        Assert.True(p.RequiresGrad);
        Assert.Null(p.Grad);
        Assert.False(p.Detach().RequiresGrad);
        Assert.False((p * 2).IsLeaf);
    }

    [Fact]
    public void ShapeOps()
    {
        using var scope = DisposeScope.Begin();
        var t = Tensor.Arange(0, 24, 1).View(2, 3, 4);
        Assert.Equal([4L, 2, 3], t.Permute(2, 0, 1).Shape);
        Assert.Equal([6L, 4], t.Reshape(6, 4).Shape);
        Assert.Equal([2L, 4, 3], t.Transpose(1, 2).Shape);
        Assert.Equal([2L, 1, 3, 4], t.Unsqueeze(1).Shape);
        Assert.Equal([2L, 3, 4], t.Unsqueeze(1).Squeeze(1).Shape);
        Assert.Equal([2L, 12], t.Flatten(1).Shape);
        Assert.Equal([24L], t.Flatten().Shape);
        Assert.Equal([4f, 5, 6, 7, 16, 17, 18, 19], t.Narrow(1, 1, 1).Flatten().ToArray<float>());
        Assert.Equal([12f, 13, 14, 15], t.Select(0, 1).Select(0, 0).ToArray<float>());
        Assert.Equal(3, t.Chunk(3, 1).Length);
        Assert.Equal([2L, 1, 4], t.Chunk(3, 1)[2].Shape);
        var parts = t.Split(3, 2);
        Assert.Equal(2, parts.Length);
        Assert.Equal([2L, 3, 1], parts[1].Shape);
        Assert.Equal([2L, 6, 4], Tensor.Cat([t, t], 1).Shape);
        Assert.Equal([2L, 2, 3, 4], Tensor.Stack([t, t]).Shape);
        Assert.Equal([2L, 3, 4], Tensor.Ones([1, 3, 4]).Expand(2, 3, 4).Shape);
        Assert.Equal([2L, 6], Tensor.Ones([1, 3]).Repeat(2, 2).Shape);
        var idx = Tensor.From(new long[] { 2, 0 });
        Assert.Equal([2f, 0f], Tensor.Arange(0, 4, 1).IndexSelect(0, idx).ToArray<float>());
        var g = Tensor.From(new float[] { 1, 2, 3, 4 }, 2, 2).Gather(1, Tensor.From(new long[] { 1, 0 }, 2, 1));
        Assert.Equal([2f, 3f], g.Flatten().ToArray<float>());
        var added = Tensor.Zeros([3]).IndexAdd(0, Tensor.From(new long[] { 0, 0, 2 }), Tensor.From(new float[] { 1, 2, 3 }));
        Assert.Equal([3f, 0, 3], added.ToArray<float>());
        var padded = Tensor.Ones([1, 2]).Pad([1, 2], -1);
        Assert.Equal([-1f, 1, 1, -1, -1], padded.Flatten().ToArray<float>());
    }

    [Fact]
    public void MathAndReductions()
    {
        using var scope = DisposeScope.Begin();
        var a = Tensor.From(new double[] { 1, -2, 3, -4 }, 2, 2);
        var row = Tensor.From(new double[] { 10, 20 }, 1, 2);
        Assert.Equal([11.0, 18, 13, 16], (a + row).Flatten().ToArray<double>());
        Assert.Equal([-9.0, -22, -7, -24], (a - row).Flatten().ToArray<double>());
        Assert.Equal([21.0, 38, 23, 36], a.Add(row, 2).Flatten().ToArray<double>());
        Assert.Equal([2.0, -4, 6, -8], (a * 2).Flatten().ToArray<double>());
        Assert.Equal([2.0, -4, 6, -8], (2 * a).Flatten().ToArray<double>());
        Assert.Equal([0.0, 3, -2, 5], (1 - a).Flatten().ToArray<double>());
        Assert.Equal([1.0, -0.5], (1 / Tensor.From(new double[] { 1, -2 })).ToArray<double>());
        Assert.Equal([-1.0, 2, -3, 4], (-a).Flatten().ToArray<double>());
        Assert.Equal(-2.0, a.Sum().ItemDouble());
        Assert.Equal(-0.5, a.Mean().ItemDouble());
        Assert.Equal([-1.0, -1], a.Sum([1L]).ToArray<double>());
        Assert.Equal([1L, 2], a.Mean([0L], keepDim: true).Shape);
        Assert.Equal([2.0, -3], a.Mean([0L]).ToArray<double>());
        Assert.Equal(3.0, a.Max().ItemDouble());
        Assert.Equal(-4.0, a.Min().ItemDouble());
        var (vals, ids) = a.Max(1);
        Assert.Equal([1.0, 3], vals.ToArray<double>());
        Assert.Equal([0L, 0], ids.ToArray<long>());
        Assert.Equal([0L, 0], a.ArgMax(1).ToArray<long>());
        Assert.Equal(Math.Sqrt(30), a.Norm().ItemDouble(), 12);
        Assert.Equal(10.0, a.Norm(1).ItemDouble(), 12);
        Assert.Equal([Math.Sqrt(5), 5], a.Norm(2, [1L]).ToArray<double>());
        var (tv, ti) = Tensor.From(new float[] { 3, 1, 4, 1, 5 }).TopK(2);
        Assert.Equal([5f, 4], tv.ToArray<float>());
        Assert.Equal([4L, 2], ti.ToArray<long>());
        Assert.Equal([1f, 1], Tensor.From(new float[] { 3, 1, 4, 1, 5 }).TopK(2, largest: false).Values.ToArray<float>());
        var sm = a.Softmax(-1).Sum([1L]).ToArray<double>();
        Assert.All(sm, x => Assert.Equal(1.0, x, 12));
        Assert.True(a.LogSoftmax(1).Exp().AllClose(a.Softmax(1)));
        Assert.Equal([1.0, 4, 9, 16], a.Square().Flatten().ToArray<double>());
        Assert.Equal([1.0, 2, 3, 4], a.Abs().Flatten().ToArray<double>());
        Assert.Equal([1.0, 0, 3, 0], a.Relu().Flatten().ToArray<double>());
        Assert.Equal([1.0, -2, 2, -4], a.Clamp(null, 2).Flatten().ToArray<double>());
        Assert.Equal([1.0, -1, 2, -1], a.Clamp(-1, 2).Flatten().ToArray<double>());
        Assert.Equal([1.0, 4], a.Abs().Flatten().Narrow(0, 0, 2).Pow(2).ToArray<double>());
        Assert.Equal([0.5], Tensor.From(new double[] { 4 }).Rsqrt().ToArray<double>());
        Assert.Equal([2.0], Tensor.From(new double[] { 4 }).Sqrt().ToArray<double>());
        var one = Tensor.Scalar(1, ScalarType.Float64);
        var sig = 1 / (1 + Math.Exp(-1));
        Assert.Equal(Math.Sin(1) + Math.Cos(1) + Math.Tanh(1) + Math.Exp(1) + sig + sig,
            (one.Sin() + one.Cos() + one.Tanh() + one.Exp() + one.Sigmoid() + one.Silu()).ItemDouble(), 12);
        Assert.Equal(0, Tensor.Scalar(1, ScalarType.Float64).Log().ItemDouble());
        Assert.Equal([true, false, true, false], a.Gt(0).Flatten().ToArray<bool>());
        Assert.Equal([false, true, false, true], a.Lt(0).Flatten().ToArray<bool>());
        Assert.Equal([true, false, false, false], a.Eq(1).Flatten().ToArray<bool>());
        Assert.Equal([false, true, true, true], a.Ne(Tensor.Scalar(1, ScalarType.Float64)).Flatten().ToArray<bool>());
        Assert.Equal([true, false, true, false], a.Ge(a.Abs()).Flatten().ToArray<bool>());
        Assert.Equal([true, true, true, true], a.Le(a.Abs()).Flatten().ToArray<bool>());
        Assert.Equal([false, true, false, true], a.Gt(0).LogicalNot().Flatten().ToArray<bool>());
        Assert.Equal([1.0, 0, 3, 0], Tensor.Where(a.Gt(0), a, Tensor.Zeros([1], ScalarType.Float64)).Flatten().ToArray<double>());
        Assert.Equal([9.0, -2, 9, -4], a.MaskedFill(a.Gt(0), 9).Flatten().ToArray<double>());
        Assert.Equal([1.0, 0, 3, -4], a.Tril().Flatten().ToArray<double>());
        Assert.Equal([1.0, -2, 0, -4], a.Triu().Flatten().ToArray<double>());
        Assert.Equal([0.0, -2, 0, 0], a.Triu(1).Flatten().ToArray<double>());
        var m = Tensor.From(new double[] { 1, 2 }, 1, 2);
        Assert.Equal([5.0], m.MatMul(m.T()).Flatten().ToArray<double>());
        Assert.Equal([1L, 1, 1], m.Unsqueeze(0).Bmm(m.T().Unsqueeze(0)).Shape);
        Assert.Equal([1.5, -1.5, 3.5, -3.5], a.Add(1.5).Sub(1).Flatten().ToArray<double>());
        Assert.Equal([0.5, -1, 1.5, -2], a.Mul(0.5).Flatten().ToArray<double>());
        Assert.Equal([0.5, -1, 1.5, -2], a.Div(2).Flatten().ToArray<double>());
        Assert.Equal([1.0, 1, 1, 1], a.Div(a).Flatten().ToArray<double>());
        Assert.True(a.Gelu().AllClose(a.Gelu(true), 1e-2, 1e-3));
        Assert.Equal(ScalarType.Bool, a.Gt(0).DType);
        Assert.Equal(ScalarType.BFloat16, a.To(ScalarType.BFloat16).DType);
        Assert.Equal(ScalarType.Float16, a.To(Device.Cpu, ScalarType.Float16).DType);
        Assert.Equal(Device.Cpu, a.To(Device.Cpu).Device);
    }

    [Fact]
    public void InPlaceAndAutograd()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(4);
        var t = Tensor.Zeros([3]);
        Assert.Same(t, t.Fill_(2));
        Assert.Equal([2f, 2, 2], t.ToArray<float>());
        t.Mul_(3).Add_(Tensor.Ones([3]), 2);
        Assert.Equal([8f, 8, 8], t.ToArray<float>());
        t.Copy_(Tensor.From(new float[] { 1, 2, 3 }));
        Assert.Equal([1f, 2, 3], t.ToArray<float>());
        t.Zero_();
        Assert.Equal([0f, 0, 0], t.ToArray<float>());
        Assert.All(Tensor.Empty([100]).Uniform_(2, 3, gen).ToArray<float>(), x => Assert.InRange(x, 2f, 3f));
        var n = Tensor.Empty([10000]).Normal_(5, 0.1, gen);
        Assert.Equal(5.0, n.Mean().ItemDouble(), 1);

        var x = Tensor.From(new double[] { 1, 2, 3 }).RequiresGrad_();
        var y = (x * x).Sum();
        y.Backward(retainGraph: true);
        Assert.Equal([2.0, 4, 6], x.Grad!.ToArray<double>());
        y.Backward(); // accumulates
        Assert.Equal([4.0, 8, 12], x.Grad!.ToArray<double>());
        var z = Tensor.From(new double[] { 1, 1 }).RequiresGrad_();
        (z * 3).Backward(Tensor.From(new double[] { 1, 2 }));
        Assert.Equal([3.0, 6], z.Grad!.ToArray<double>());
        Assert.True(F.Dropout(Tensor.Ones([4]), 0.5, false).AllClose(Tensor.Ones([4])));
        var dropped = F.Dropout(Tensor.Ones([1000]), 0.5, true).ToArray<float>();
        Assert.All(dropped, v => Assert.True(v == 0 || v == 2));
    }
}

/// <summary>Prints the binding's per-op cost (no timing assertion); serial so other tests do not skew it.</summary>
[Collection("TorchSerial")]
public sealed class OverheadTests(ITestOutputHelper output)
{
    [Fact]
    public void PerOpOverhead()
    {
        using var a = DisposeScope.Keep(Tensor.From(new float[] { 1, 2, 3, 4 }));
        using var b = DisposeScope.Keep(Tensor.From(new float[] { 4, 3, 2, 1 }));
        const int n = 200_000;
        double Measure(Action op, int n = n)
        {
            for (var i = 0; i < n / 40; i++) op();
            var sw = Stopwatch.StartNew();
            for (var i = 0; i < n; i++) op();
            return sw.Elapsed.TotalMicroseconds / n;
        }
        var add = Measure(() => { using var c = a + b; });
        // Inside per-step scopes of 100 ops, the way training code runs.
        var scoped = Measure(() =>
        {
            using var s = DisposeScope.Begin();
            for (var i = 0; i < 100; i++) _ = a + b;
        }, n / 100) / 100;
        var dim = Measure(() => _ = a.Dim);
        output.WriteLine($"add of two 4-element tensors (create + dispose): {add:F2} µs/op; in scopes: {scoped:F2} µs/op; Dim query: {dim * 1000:F0} ns/op");
        using var sum = a + b;
        Assert.Equal([5f, 5, 5, 5], sum.ToArray<float>());
    }
}

/// <summary>The global generator is process-wide: other test classes (training on the same device) reseed it, so the
/// check that a reseed repeats the draws runs alone.</summary>
[Collection("TorchSerial")]
public sealed class GlobalSeedTests
{
    [Fact]
    public void SeedingIsDeterministic()
    {
        using var scope = DisposeScope.Begin();
        TorchApi.ManualSeed(123);
        var a = Tensor.Randn([5]).ToArray<float>();
        TorchApi.ManualSeed(123);
        var b = Tensor.Randn([5]).ToArray<float>();
        Assert.Equal(a, b);
        using var g1 = new Generator(9);
        using var g2 = new Generator(9);
        Assert.Equal(Tensor.Rand([4], g1).ToArray<float>(), Tensor.Rand([4], g2).ToArray<float>());
        Assert.Equal(Tensor.RandPerm(10, g1).ToArray<long>(), Tensor.RandPerm(10, g2).ToArray<long>());
        Assert.Equal(9, g1.Seed);
        var u = Tensor.Rand([1000], g1).ToArray<float>();
        Assert.All(u, x => Assert.InRange(x, 0f, 1f));
        var perm = Tensor.RandPerm(10, g1).ToArray<long>();
        Assert.Equal(Enumerable.Range(0, 10).Select(i => (long)i), perm.Order());
        Assert.All(Tensor.RandInt(3, 5, [100], g1).ToArray<long>(), x => Assert.InRange(x, 3, 4));
    }
}
