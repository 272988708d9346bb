using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace FineTune.Worker.Torch;

/// <summary>
/// A handle to a libtorch tensor. Freed by Dispose (idempotent), by the innermost <see cref="DisposeScope"/> open at
/// creation, or by the finalizer as a last resort.
/// </summary>
public sealed unsafe partial class Tensor : IDisposable
{
    private static long _live;
    private IntPtr _handle;

    /// <summary>Tensors created and not yet freed, process-wide.</summary>
    public static long LiveCount => Interlocked.Read(ref _live);

    internal DisposeScope? Scope { get; set; }

    internal Tensor(IntPtr handle)
    {
        _handle = Native.Check(handle);
        Interlocked.Increment(ref _live);
        DisposeScope.Current?.Add(this);
    }

    internal IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(Tensor));

    public bool IsDisposed => _handle == IntPtr.Zero;

    public void Dispose()
    {
        var h = Interlocked.Exchange(ref _handle, IntPtr.Zero);
        if (h == IntPtr.Zero) return;
        Native.ft_free(h);
        Interlocked.Decrement(ref _live);
        GC.SuppressFinalize(this);
    }

    ~Tensor()
    {
        var h = Interlocked.Exchange(ref _handle, IntPtr.Zero);
        if (h == IntPtr.Zero) return;
        Native.ft_free(h);
        Interlocked.Decrement(ref _live);
    }

    /// <summary>Moves this tensor from its scope to the enclosing one (or to no scope: the caller owns it).</summary>
    public Tensor MoveToOuterScope()
    {
        var s = Scope;
        if (s == null) return this;
        s.Remove(this);
        Scope = null;
        s.Outer?.Add(this);
        return this;
    }

    internal static Tensor Wrap(IntPtr h) => new(h);

    // ------------------------------------------------------------------ factories
    private static Tensor Factory(int kind, long[] shape, double value, ScalarType dtype, Device? device, bool requiresGrad)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        fixed (long* s = shape)
        {
            var t = Wrap(Native.ft_factory(kind, s, shape.Length, value, (int)dtype, d.NativeType, d.Index));
            if (requiresGrad) t.RequiresGrad = true;
            return t;
        }
    }

    public static Tensor Zeros(long[] shape, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Factory(0, shape, 0, dtype, device, requiresGrad);
    public static Tensor Ones(long[] shape, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Factory(1, shape, 0, dtype, device, requiresGrad);
    public static Tensor Empty(long[] shape, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Factory(2, shape, 0, dtype, device, requiresGrad);
    public static Tensor Full(long[] shape, double value, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Factory(3, shape, value, dtype, device, requiresGrad);

    public static Tensor Arange(long end, ScalarType dtype = ScalarType.Int64, Device? device = null) =>
        Arange(0, end, 1, dtype, device);

    public static Tensor Arange(double start, double end, double step, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        var t = Wrap(Native.ft_arange(start, end, step, (int)dtype, d.NativeType, d.Index));
        if (requiresGrad) t.RequiresGrad = true;
        return t;
    }

    private static Tensor Random(int kind, long[] shape, Generator? gen, ScalarType dtype, Device? device, bool requiresGrad)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        fixed (long* s = shape)
        {
            var t = Wrap(Native.ft_random(kind, s, shape.Length, gen?.Handle ?? IntPtr.Zero, (int)dtype, d.NativeType, d.Index));
            GC.KeepAlive(gen);
            if (requiresGrad) t.RequiresGrad = true;
            return t;
        }
    }

    /// <summary>Standard normal samples.</summary>
    public static Tensor Randn(long[] shape, Generator? gen = null, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Random(0, shape, gen, dtype, device, requiresGrad);

    /// <summary>Uniform samples in [0, 1).</summary>
    public static Tensor Rand(long[] shape, Generator? gen = null, ScalarType dtype = ScalarType.Float32, Device? device = null, bool requiresGrad = false) =>
        Random(1, shape, gen, dtype, device, requiresGrad);

    public static Tensor RandInt(long low, long high, long[] shape, Generator? gen = null, ScalarType dtype = ScalarType.Int64, Device? device = null)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        fixed (long* s = shape)
        {
            var t = Wrap(Native.ft_randint(low, high, s, shape.Length, gen?.Handle ?? IntPtr.Zero, (int)dtype, d.NativeType, d.Index));
            GC.KeepAlive(gen);
            return t;
        }
    }

    public static Tensor RandPerm(long n, Generator? gen = null, Device? device = null)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        var t = Wrap(Native.ft_randperm(n, gen?.Handle ?? IntPtr.Zero, d.NativeType, d.Index));
        GC.KeepAlive(gen);
        return t;
    }

    public static Tensor From(float[] data, params long[] shape) => From<float>(data, Shape1(data.Length, shape));
    public static Tensor From(double[] data, params long[] shape) => From<double>(data, Shape1(data.Length, shape));
    public static Tensor From(long[] data, params long[] shape) => From<long>(data, Shape1(data.Length, shape));
    public static Tensor From(int[] data, params long[] shape) => From<int>(data, Shape1(data.Length, shape));
    public static Tensor From(byte[] data, params long[] shape) => From<byte>(data, Shape1(data.Length, shape));
    public static Tensor From(bool[] data, params long[] shape) => From<bool>(data, Shape1(data.Length, shape));

    private static long[] Shape1(int length, long[] shape) => shape.Length == 0 ? [length] : shape;

    /// <summary>Copies <paramref name="data"/> into a new CPU tensor of the matching dtype.</summary>
    public static Tensor From<T>(ReadOnlySpan<T> data, long[] shape) where T : unmanaged =>
        FromBytes(MemoryMarshal.AsBytes(data), ScalarTypes.Of<T>(), shape);

    /// <summary>Copies raw little-endian bytes of any dtype (bf16/f16 included) into a new tensor.</summary>
    public static Tensor FromBytes(ReadOnlySpan<byte> raw, ScalarType dtype, long[] shape, Device? device = null)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        fixed (byte* p = raw)
        fixed (long* s = shape)
            return Wrap(Native.ft_from_data(p, raw.Length, s, shape.Length, (int)dtype, d.NativeType, d.Index));
    }

    /// <summary>Copies <paramref name="nbytes"/> raw bytes (may exceed 2 GiB) into a new CPU tensor.</summary>
    internal static Tensor FromPointer(byte* data, long nbytes, ScalarType dtype, long[] shape)
    {
        Native.EnsureLoaded();
        fixed (long* s = shape)
            return Wrap(Native.ft_from_data(data, nbytes, s, shape.Length, (int)dtype, 0, 0));
    }

    public static Tensor ZerosLike(Tensor t) => t.Unary(UnaryOp.ZerosLike);
    public static Tensor OnesLike(Tensor t) => t.Unary(UnaryOp.OnesLike);

    public static Tensor Scalar(double value, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        return Wrap(Native.ft_scalar(value, (int)dtype, d.NativeType, d.Index));
    }

    // ------------------------------------------------------------------ info
    public int Dim => Native.ft_dim(Handle);

    public long[] Shape
    {
        get
        {
            var h = Handle;
            Span<long> buf = stackalloc long[16];
            fixed (long* p = buf)
            {
                var n = Native.ft_shape(h, p, buf.Length);
                if (n <= buf.Length) return buf[..n].ToArray();
                var big = new long[n];
                fixed (long* q = big) Native.ft_shape(h, q, n);
                return big;
            }
        }
    }

    public long NumEl => Native.ft_numel(Handle);

    public long Size(int dim)
    {
        var s = Shape;
        var d = dim < 0 ? dim + s.Length : dim;
        if (d < 0 || d >= s.Length)
            throw new TorchException($"Dimension out of range (expected to be in range of [{-s.Length}, {s.Length - 1}], but got {dim})");
        return s[d];
    }

    public ScalarType DType => (ScalarType)Native.ft_dtype(Handle);

    public Device Device
    {
        get
        {
            int index;
            var kind = Native.ft_device(Handle, &index);
            return kind == 1 ? Device.Cuda(index) : Device.Cpu;
        }
    }

    public bool RequiresGrad
    {
        get => Native.ft_requires_grad(Handle) != 0;
        set => Native.Check(Native.ft_set_requires_grad(Handle, value ? 1 : 0));
    }

    /// <summary>A new handle on the gradient, or null when there is none.</summary>
    public Tensor? Grad
    {
        get
        {
            IntPtr g;
            return Native.Check(Native.ft_grad(Handle, &g)) == 1 ? Wrap(g) : null;
        }
    }

    public bool IsContiguous => Native.ft_is_contiguous(Handle) != 0;
    public bool IsLeaf => Native.ft_is_leaf(Handle) != 0;
    public long ElementSize => Native.ft_element_size(Handle);

    public override string ToString() =>
        IsDisposed ? "Tensor(disposed)" : $"Tensor([{string.Join(", ", Shape)}], {DType}, {Device})";

    // ------------------------------------------------------------------ read-back
    public T[] ToArray<T>() where T : unmanaged
    {
        var dt = DType;
        if (!ScalarTypes.Matches<T>(dt))
            throw new TorchException($"cannot read a {dt} tensor as {typeof(T).Name}[]");
        var result = new T[NumEl];
        fixed (T* p = result)
            Native.Check(Native.ft_copy_to(Handle, p, (long)result.Length * sizeof(T)));
        return result;
    }

    /// <summary>Contiguous little-endian raw bytes of any dtype.</summary>
    public byte[] ToBytes()
    {
        var result = new byte[NumEl * ElementSize];
        fixed (byte* p = result)
            Native.Check(Native.ft_copy_to(Handle, p, result.Length));
        return result;
    }

    public double ItemDouble() { double v; Native.Check(Native.ft_item_double(Handle, &v)); return v; }
    public float ItemFloat() => (float)ItemDouble();
    public long ItemLong() { long v; Native.Check(Native.ft_item_long(Handle, &v)); return v; }
    public bool ItemBool() { int v; Native.Check(Native.ft_item_bool(Handle, &v)); return v != 0; }

    // ------------------------------------------------------------------ conversions
    public Tensor To(ScalarType dtype) => Wrap(Native.ft_to(Handle, (int)dtype, -1, 0, 0));
    public Tensor To(Device device, bool nonBlocking = false) => Wrap(Native.ft_to(Handle, -1, device.NativeType, device.Index, nonBlocking ? 1 : 0));
    public Tensor To(Device device, ScalarType dtype) => Wrap(Native.ft_to(Handle, (int)dtype, device.NativeType, device.Index, 0));
    public Tensor Clone() => Unary(UnaryOp.Clone);
    public Tensor Detach() => Unary(UnaryOp.Detach);
    public Tensor Contiguous() => Unary(UnaryOp.Contiguous);
    public Tensor PinMemory() => Unary(UnaryOp.PinMemory);
    public Tensor RequiresGrad_(bool on = true) { RequiresGrad = on; return this; }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal Tensor Unary(UnaryOp op)
    {
        var r = Wrap(Native.ft_unary(Handle, (int)op));
        GC.KeepAlive(this); // a temporary's finalizer must not free the handle while libtorch still uses it
        return r;
    }
}

internal enum UnaryOp
{
    Neg, Sqrt, Rsqrt, Exp, Log, Abs, Square, Sin, Cos, Tanh, Sigmoid, Relu, Silu, Gelu, GeluTanh, LogicalNot,
    Sum, Mean, Max, Min, Clone, Detach, Contiguous, PinMemory, T, ZerosLike, OnesLike, Inverse,
}

internal enum BinaryOp { Add, Sub, Mul, Div, MatMul, Bmm, Eq, Ne, Lt, Le, Gt, Ge, Solve, Pow }

internal enum ScalarOp { Add, Sub, Mul, Div, Pow, Eq, Ne, Lt, Le, Gt, Ge, RSub, RDiv }

internal enum DimOp { Transpose, Unsqueeze, Squeeze, Flatten, Narrow, Select, Tril, Triu, ArgMax, Softmax, LogSoftmax }

internal enum ShapeOp { View, Reshape, Permute, Expand, Repeat }

internal enum InplaceOp { Zero, Fill, Copy, Add, Mul, Uniform, Normal }
