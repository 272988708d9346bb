using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Torch;

public sealed class LinalgTests
{
    [Fact]
    public void SvdReconstructs()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(5);
        var a = Tensor.Randn([6, 4], gen, ScalarType.Float64);
        var (u, s, vh) = Linalg.Svd(a);
        Assert.Equal([6L, 4], u.Shape);
        Assert.True((u * s.Unsqueeze(0)).MatMul(vh).AllClose(a, 1e-10, 1e-10));
        var (uf, _, _) = Linalg.Svd(a, fullMatrices: true);
        Assert.Equal([6L, 6], uf.Shape);
        var sv = s.ToArray<double>();
        Assert.True(sv.Zip(sv.Skip(1)).All(p => p.First >= p.Second));
    }

    [Fact]
    public void QrReconstructsAndQIsOrthonormal()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(6);
        var a = Tensor.Randn([5, 3], gen, ScalarType.Float64);
        var (q, r) = Linalg.Qr(a);
        Assert.True(q.MatMul(r).AllClose(a, 1e-10, 1e-10));
        Assert.True(q.T().MatMul(q).AllClose(Tensor.From(new double[] { 1, 0, 0, 0, 1, 0, 0, 0, 1 }, 3, 3), 1e-10, 1e-10));
        Assert.True(r.AllClose(r.Triu()));
        var (qc, _) = Linalg.Qr(a, reduced: false);
        Assert.Equal([5L, 5], qc.Shape);
    }

    [Fact]
    public void InverseAndSolve()
    {
        using var scope = DisposeScope.Begin();
        using var gen = new Generator(7);
        var a = Tensor.Randn([4, 4], gen, ScalarType.Float64) + Tensor.Full([4], 4.0, ScalarType.Float64).Unsqueeze(0) * Tensor.Ones([4, 4], ScalarType.Float64).Tril().Triu();
        var eye = Tensor.Ones([4, 4], ScalarType.Float64).Tril().Triu();
        Assert.True(a.MatMul(Linalg.Inverse(a)).AllClose(eye, 1e-10, 1e-10));
        var b = Tensor.Randn([4, 2], gen, ScalarType.Float64);
        var x = Linalg.Solve(a, b);
        Assert.True(a.MatMul(x).AllClose(b, 1e-10, 1e-10));
    }
}
