using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;

namespace FineTune.Worker.Tests.Torch;

[Collection("TorchSerial")]
public sealed class MemoryTests(ITestOutputHelper output)
{
    [Fact]
    public void ThousandStepsInScopesDoNotGrowNativeMemory()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var baseline = Tensor.LiveCount;
        using var gen = new Generator(1);
        var live = new long[3];
        {
            using var model = new TestLinear(64, 64, gen);
            using var head = new TestLinear(64, 8, gen);
            using var opt = new AdamW([new ParamGroup("all", [.. model.Parameters(), .. head.Parameters()], 1e-3, 0.01)]);
            live[0] = Tensor.LiveCount;
            long rss100 = 0, rss1000 = 0;
            for (var step = 1; step <= 1000; step++)
            {
                using (DisposeScope.Begin())
                {
                    var x = Tensor.Randn([32, 64], gen);
                    var y = Tensor.RandInt(0, 8, [32], gen);
                    var loss = F.CrossEntropy(head.Forward(model.Forward(x).Silu()), y);
                    loss.Backward();
                    GradClip.ClipGradNorm(model.Parameters(), 1.0);
                    opt.Step();
                    opt.ZeroGrad();
                    _ = loss.ItemDouble();
                    _ = model.Weight.Grad;
                }
                if (step == 100) { live[1] = Tensor.LiveCount; rss100 = TestUtil.RssBytes(); }
                if (step == 1000) { live[2] = Tensor.LiveCount; rss1000 = TestUtil.RssBytes(); }
            }
            output.WriteLine($"RSS after step 100: {rss100 / 1e6:F1} MB, after step 1000: {rss1000 / 1e6:F1} MB; live tensors {live[0]} / {live[1]} / {live[2]}");
            Assert.Equal(live[0], live[1]);
            Assert.Equal(live[0], live[2]);
            Assert.True(rss1000 - rss100 < 20_000_000, $"RSS grew by {(rss1000 - rss100) / 1e6:F1} MB between step 100 and 1000");
        }
        Assert.Equal(baseline, Tensor.LiveCount);
    }

    [Fact]
    public void ScopesNestAndMoveTensorsOut()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var baseline = Tensor.LiveCount;
        Tensor kept, moved, inner;
        using (var outer = DisposeScope.Begin())
        {
            using (DisposeScope.Begin())
            {
                inner = Tensor.Ones([2]);
                moved = (inner * 2).MoveToOuterScope();
                kept = DisposeScope.Keep(inner + 1);
            }
            Assert.True(inner.IsDisposed);
            Assert.False(moved.IsDisposed);
            Assert.Equal(1, outer.Count);
        }
        Assert.True(moved.IsDisposed);
        Assert.False(kept.IsDisposed);
        Assert.Equal([2f, 2f], kept.ToArray<float>());
        kept.Dispose();
        Assert.Equal(baseline, Tensor.LiveCount);
    }
}
