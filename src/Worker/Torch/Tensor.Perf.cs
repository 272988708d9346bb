namespace FineTune.Worker.Torch;

// Additions for the training path's speed: in-place dtype changes of trained tensors, reductions that accumulate in
// another dtype, and host-to-GPU uploads that do not make the host wait.
public sealed unsafe partial class Tensor
{
    /// <summary>
    /// Replaces this tensor's data with <paramref name="data"/> (dtype and device may differ), keeping this object,
    /// its handle and its autograd identity (PyTorch's <c>p.data = …</c>): a layer holding this tensor sees the new
    /// dtype. Returns this.
    /// </summary>
    public Tensor SetData_(Tensor data)
    {
        Native.Check(Native.ft_set_data(Handle, data.Handle));
        GC.KeepAlive(data);
        return this;
    }

    /// <summary>Sum over <paramref name="dims"/>, accumulated and returned in <paramref name="dtype"/> (e.g. a bf16
    /// tensor summed in fp32 without an fp32 copy of it).</summary>
    public Tensor Sum(long[] dims, bool keepDim, ScalarType dtype)
    {
        fixed (long* d = dims)
        {
            var r = Wrap(Native.ft_sum_dtype(Handle, d, dims.Length, keepDim ? 1 : 0, (int)dtype));
            GC.KeepAlive(this);
            return r;
        }
    }

    /// <summary>
    /// A tensor on <paramref name="device"/> from host data. On a GPU the data goes through a page-locked buffer and an
    /// asynchronous copy, so the host does not wait for the GPU's queue to drain (a copy from ordinary memory does:
    /// one host sync per batch). On the CPU this is <see cref="From{T}(ReadOnlySpan{T}, long[])"/>.
    /// </summary>
    public static Tensor FromAsync<T>(ReadOnlySpan<T> data, long[] shape, Device device) where T : unmanaged
    {
        Native.EnsureLoaded();
        var raw = System.Runtime.InteropServices.MemoryMarshal.AsBytes(data);
        fixed (byte* p = raw)
        fixed (long* s = shape)
            return Wrap(Native.ft_from_data_async(p, raw.Length, s, shape.Length, (int)ScalarTypes.Of<T>(), device.NativeType, device.Index));
    }
}
