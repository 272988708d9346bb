using FineTune.Worker.Torch;
using static FineTune.Worker.Tests.Torch.TestUtil;

namespace FineTune.Worker.Tests.Torch;

public sealed class GradientTests
{
    [Fact]
    public void SoftmaxCrossEntropyOfLinearLayer()
    {
        var targets = new long[] { 0, 4, -100, 2 };
        CheckGradients(a =>
        {
            using var t = Tensor.From(targets);
            return F.CrossEntropy(F.Linear(a[0], a[1], a[2]), t);
        }, (RandomData(12, 1), [4, 3]), (RandomData(15, 2), [5, 3]), (RandomData(5, 3), [5]));
    }

    [Fact]
    public void CrossEntropySumAndNoneReductions()
    {
        var targets = new long[] { 1, 0, 2 };
        CheckGradients(a =>
        {
            using var t = Tensor.From(targets);
            var none = F.CrossEntropy(a[0], t, reduction: "none");
            return F.CrossEntropy(a[0], t, reduction: "sum") + (none * none).Sum();
        }, (RandomData(9, 4), [3, 3]));
    }

    [Fact]
    public void RmsNormSiluChain()
    {
        var mix = RandomData(12, 7);
        CheckGradients(a =>
        {
            using var m = Tensor.From(mix, 3, 4);
            var h = F.RmsNorm(a[0], a[1], 1e-6).Silu();
            return (F.Linear(h, a[2]) * m.Narrow(1, 0, 2)).Sum() + h.Gelu().Mean() + h.Gelu(true).Pow(2).Sum();
        }, (RandomData(12, 5, 2), [3, 4]), (RandomData(4, 6), [4]), (RandomData(8, 8), [2, 4]));
    }

    [Fact]
    public void CausalAttention()
    {
        var mix = RandomData(2 * 2 * 3 * 4, 11);
        CheckGradients(a =>
        {
            using var m = Tensor.From(mix, 2, 2, 3, 4);
            return (F.ScaledDotProductAttention(a[0], a[1], a[2], isCausal: true) * m).Sum();
        }, (RandomData(48, 12), [2, 2, 3, 4]), (RandomData(48, 13), [2, 2, 3, 4]), (RandomData(48, 14), [2, 2, 3, 4]));
    }

    [Fact]
    public void AttentionWithExplicitMaskAndEmbedding()
    {
        var keep = new[] { true, false, true, true, true, false, true, true, true };
        CheckGradients(a =>
        {
            using var mask = Tensor.From(keep, 3, 3);
            using var ids = Tensor.From(new long[] { 2, 0, 1 });
            var x = F.Embedding(a[0], ids).View(1, 1, 3, 2);
            var o = F.ScaledDotProductAttention(x, x * 0.5, x.Sin(), mask);
            return o.Square().Sum() + x.Softmax(-1).Log().Sum();
        }, (RandomData(8, 15), [4, 2]));
    }

    [Fact]
    public void AttentionFallbackMatchesExplicitMath()
    {
        using var scope = DisposeScope.Begin();
        var gen = new Generator(3);
        var q = Tensor.Randn([1, 2, 5, 8], gen, ScalarType.Float64);
        var k = Tensor.Randn([1, 2, 5, 8], gen, ScalarType.Float64);
        var v = Tensor.Randn([1, 2, 5, 8], gen, ScalarType.Float64);
        var scores = q.MatMul(k.Transpose(-2, -1)) / Math.Sqrt(8);
        var causal = Tensor.Ones([5, 5], ScalarType.Bool).Tril();
        var reference = scores.MaskedFill(causal.LogicalNot(), double.NegativeInfinity).Softmax(-1).MatMul(v);
        Assert.True(F.ScaledDotProductAttention(q, k, v, isCausal: true).AllClose(reference, 1e-10, 1e-12));
        var additive = Tensor.Where(causal, Tensor.Scalar(0, ScalarType.Float64), Tensor.Scalar(double.NegativeInfinity, ScalarType.Float64));
        Assert.True(F.ScaledDotProductAttention(q, k, v, additive).AllClose(reference, 1e-10, 1e-12));
        gen.Dispose();
    }
}
