using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Torch;

public sealed class ErrorTests
{
    [Fact]
    public void MatmulShapeMismatchSurfacesLibtorchMessage()
    {
        using var scope = DisposeScope.Begin();
        var a = Tensor.Ones([2, 3]);
        var b = Tensor.Ones([4, 5]);
        var ex = Assert.Throws<TorchException>(() => a.MatMul(b));
        Assert.Contains("cannot be multiplied", ex.Message);
        Assert.DoesNotContain("Exception raised from", ex.Message);
        Assert.DoesNotContain("frame #", ex.Message);
        // The process and the library keep working.
        Assert.Equal([2L, 2], a.MatMul(Tensor.Ones([3, 2])).Shape);
    }

    [Fact]
    public void BadDtypesAndShapesThrow()
    {
        using var scope = DisposeScope.Begin();
        var f = Tensor.Ones([2, 3]);
        var ints = Tensor.Ones([2, 3], ScalarType.Int64);
        Assert.Throws<TorchException>(() => F.CrossEntropy(f, f.Sum([1L])));      // float targets of the wrong shape
        Assert.Throws<TorchException>(() => F.Embedding(f, f));                   // float indices
        Assert.Throws<TorchException>(() => f.MatMul(ints));                      // mixed dtypes
        Assert.Throws<TorchException>(() => f.View(4, 4));
        Assert.Throws<TorchException>(() => Tensor.Cat([f, Tensor.Ones([2, 3, 1])]));
        Assert.Throws<TorchException>(() => f.ToArray<long>());
        Assert.Throws<TorchException>(() => f.Size(5));
        Assert.Throws<TorchException>(() => Tensor.Ones([2]).Backward());        // does not require grad
        Assert.Throws<TorchException>(() => Tensor.FromBytes(new byte[3], ScalarType.Float32, [1]));
        var ex = Assert.Throws<TorchException>(() => Tensor.Ones([3]).To(Device.Cuda(7)));
        Assert.False(string.IsNullOrWhiteSpace(ex.Message));
        Assert.Equal(6, f.Sum().ItemDouble());
    }

    [Fact]
    public void DisposedTensorThrowsManagedException()
    {
        var t = Tensor.Ones([1]);
        t.Dispose();
        t.Dispose();
        Assert.True(t.IsDisposed);
        Assert.Throws<ObjectDisposedException>(() => t.Sum());
    }
}
