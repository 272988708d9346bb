namespace FineTune.Worker.Torch;

public sealed unsafe partial class Tensor
{
    private Tensor Binary(Tensor other, BinaryOp op, double alpha = 1)
    {
        var r = Wrap(Native.ft_binary(Handle, other.Handle, (int)op, alpha));
        GC.KeepAlive(this);
        GC.KeepAlive(other);
        return r;
    }

    private Tensor ScalarBinary(double s, ScalarOp op)
    {
        var r = Wrap(Native.ft_binary_scalar(Handle, s, (int)op));
        GC.KeepAlive(this);
        return r;
    }

    private Tensor DimOperation(DimOp op, long p0, long p1 = 0, long p2 = 0)
    {
        var r = Wrap(Native.ft_dimop(Handle, (int)op, p0, p1, p2));
        GC.KeepAlive(this);
        return r;
    }

    private Tensor ShapeOperation(ShapeOp op, long[] shape)
    {
        fixed (long* s = shape)
        {
            var r = Wrap(Native.ft_shapeop(Handle, (int)op, s, shape.Length));
            GC.KeepAlive(this);
            return r;
        }
    }

    // ------------------------------------------------------------------ shape
    public Tensor View(params long[] shape) => ShapeOperation(ShapeOp.View, shape);
    public Tensor Reshape(params long[] shape) => ShapeOperation(ShapeOp.Reshape, shape);
    public Tensor Permute(params long[] dims) => ShapeOperation(ShapeOp.Permute, dims);
    public Tensor Expand(params long[] shape) => ShapeOperation(ShapeOp.Expand, shape);
    public Tensor Repeat(params long[] repeats) => ShapeOperation(ShapeOp.Repeat, repeats);
    public Tensor Transpose(long d0, long d1) => DimOperation(DimOp.Transpose, d0, d1);
    public Tensor T() => Unary(UnaryOp.T);
    public Tensor Unsqueeze(long dim) => DimOperation(DimOp.Unsqueeze, dim);
    public Tensor Squeeze(long dim) => DimOperation(DimOp.Squeeze, dim);
    public Tensor Flatten(long start = 0, long end = -1) => DimOperation(DimOp.Flatten, start, end);
    public Tensor Narrow(long dim, long start, long length) => DimOperation(DimOp.Narrow, dim, start, length);
    public Tensor Select(long dim, long index) => DimOperation(DimOp.Select, dim, index);

    public Tensor[] Chunk(long chunks, long dim = 0) => SplitImpl(0, chunks, dim, (int)Math.Max(chunks, 1));

    public Tensor[] Split(long splitSize, long dim = 0)
    {
        var size = Size((int)dim);
        var cap = splitSize > 0 ? (int)Math.Max(1, (size + splitSize - 1) / splitSize) : 1;
        return SplitImpl(1, splitSize, dim, cap);
    }

    private Tensor[] SplitImpl(int kind, long arg, long dim, int cap)
    {
        var handles = new IntPtr[cap];
        fixed (IntPtr* p = handles)
        {
            var n = Native.Check(Native.ft_split(Handle, kind, arg, dim, p, cap));
            GC.KeepAlive(this);
            var result = new Tensor[n];
            for (var i = 0; i < n; i++) result[i] = Wrap(handles[i]);
            return result;
        }
    }

    public Tensor IndexSelect(long dim, Tensor index) => Index(0, dim, index, null);
    public Tensor Gather(long dim, Tensor index) => Index(1, dim, index, null);
    public Tensor IndexAdd(long dim, Tensor index, Tensor source) => Index(2, dim, index, source);

    private Tensor Index(int op, long dim, Tensor index, Tensor? source)
    {
        var r = Wrap(Native.ft_index(Handle, op, dim, index.Handle, source?.Handle ?? IntPtr.Zero));
        GC.KeepAlive(this);
        GC.KeepAlive(index);
        GC.KeepAlive(source);
        return r;
    }

    public static Tensor Cat(IReadOnlyList<Tensor> ts, long dim = 0) => CatImpl(ts, dim, 0);
    public static Tensor Stack(IReadOnlyList<Tensor> ts, long dim = 0) => CatImpl(ts, dim, 1);

    private static Tensor CatImpl(IReadOnlyList<Tensor> ts, long dim, int stack)
    {
        var handles = new IntPtr[ts.Count];
        for (var i = 0; i < handles.Length; i++) handles[i] = ts[i].Handle;
        fixed (IntPtr* p = handles)
        {
            var r = Wrap(Native.ft_cat(p, handles.Length, dim, stack));
            GC.KeepAlive(ts);
            return r;
        }
    }

    /// <summary>Constant padding; <paramref name="pad"/> in F.pad's order (last dim first: left, right, ...).</summary>
    public Tensor Pad(long[] pad, double value = 0)
    {
        fixed (long* p = pad)
        {
            var r = Wrap(Native.ft_pad(Handle, p, pad.Length, value));
            GC.KeepAlive(this);
            return r;
        }
    }

    // ------------------------------------------------------------------ math
    public static Tensor operator +(Tensor a, Tensor b) => a.Binary(b, BinaryOp.Add);
    public static Tensor operator -(Tensor a, Tensor b) => a.Binary(b, BinaryOp.Sub);
    public static Tensor operator *(Tensor a, Tensor b) => a.Binary(b, BinaryOp.Mul);
    public static Tensor operator /(Tensor a, Tensor b) => a.Binary(b, BinaryOp.Div);
    public static Tensor operator +(Tensor a, double b) => a.ScalarBinary(b, ScalarOp.Add);
    public static Tensor operator -(Tensor a, double b) => a.ScalarBinary(b, ScalarOp.Sub);
    public static Tensor operator *(Tensor a, double b) => a.ScalarBinary(b, ScalarOp.Mul);
    public static Tensor operator /(Tensor a, double b) => a.ScalarBinary(b, ScalarOp.Div);
    public static Tensor operator +(double a, Tensor b) => b.ScalarBinary(a, ScalarOp.Add);
    public static Tensor operator -(double a, Tensor b) => b.ScalarBinary(a, ScalarOp.RSub);
    public static Tensor operator *(double a, Tensor b) => b.ScalarBinary(a, ScalarOp.Mul);
    public static Tensor operator /(double a, Tensor b) => b.ScalarBinary(a, ScalarOp.RDiv);
    public static Tensor operator -(Tensor a) => a.Unary(UnaryOp.Neg);

    public Tensor Add(Tensor other, double alpha = 1) => Binary(other, BinaryOp.Add, alpha);
    public Tensor Sub(Tensor other, double alpha = 1) => Binary(other, BinaryOp.Sub, alpha);
    public Tensor Mul(Tensor other) => Binary(other, BinaryOp.Mul);
    public Tensor Div(Tensor other) => Binary(other, BinaryOp.Div);
    public Tensor Add(double other) => ScalarBinary(other, ScalarOp.Add);
    public Tensor Sub(double other) => ScalarBinary(other, ScalarOp.Sub);
    public Tensor Mul(double other) => ScalarBinary(other, ScalarOp.Mul);
    public Tensor Div(double other) => ScalarBinary(other, ScalarOp.Div);
    public Tensor Pow(double exponent) => ScalarBinary(exponent, ScalarOp.Pow);
    public Tensor Pow(Tensor exponent) => Binary(exponent, BinaryOp.Pow);
    public Tensor Sqrt() => Unary(UnaryOp.Sqrt);
    public Tensor Rsqrt() => Unary(UnaryOp.Rsqrt);
    public Tensor Exp() => Unary(UnaryOp.Exp);
    public Tensor Log() => Unary(UnaryOp.Log);
    public Tensor Abs() => Unary(UnaryOp.Abs);
    public Tensor Neg() => Unary(UnaryOp.Neg);
    public Tensor Square() => Unary(UnaryOp.Square);
    public Tensor Sin() => Unary(UnaryOp.Sin);
    public Tensor Cos() => Unary(UnaryOp.Cos);
    public Tensor Tanh() => Unary(UnaryOp.Tanh);
    public Tensor Sigmoid() => Unary(UnaryOp.Sigmoid);
    public Tensor Relu() => Unary(UnaryOp.Relu);
    public Tensor Silu() => Unary(UnaryOp.Silu);
    public Tensor Gelu(bool tanhApprox = false) => Unary(tanhApprox ? UnaryOp.GeluTanh : UnaryOp.Gelu);

    public Tensor Clamp(double? min, double? max)
    {
        var r = Wrap(Native.ft_clamp(Handle, min ?? 0, min.HasValue ? 1 : 0, max ?? 0, max.HasValue ? 1 : 0));
        GC.KeepAlive(this);
        return r;
    }

    public Tensor MatMul(Tensor other) => Binary(other, BinaryOp.MatMul);
    public Tensor Bmm(Tensor other) => Binary(other, BinaryOp.Bmm);

    // ------------------------------------------------------------------ reductions
    private Tensor Reduce(int op, long[] dims, bool keepDim, double p)
    {
        fixed (long* d = dims)
        {
            var r = Wrap(Native.ft_reduce(Handle, op, d, dims.Length, keepDim ? 1 : 0, p));
            GC.KeepAlive(this);
            return r;
        }
    }

    public Tensor Sum() => Unary(UnaryOp.Sum);
    public Tensor Sum(long[] dims, bool keepDim = false) => Reduce(0, dims, keepDim, 0);
    public Tensor Mean() => Unary(UnaryOp.Mean);
    public Tensor Mean(long[] dims, bool keepDim = false) => Reduce(1, dims, keepDim, 0);
    public Tensor Max() => Unary(UnaryOp.Max);
    public Tensor Min() => Unary(UnaryOp.Min);

    public (Tensor Values, Tensor Indices) Max(long dim, bool keepDim = false)
    {
        IntPtr v, i;
        Native.Check(Native.ft_max_dim(Handle, dim, keepDim ? 1 : 0, &v, &i));
        GC.KeepAlive(this);
        return (Wrap(v), Wrap(i));
    }

    public Tensor ArgMax(long dim) => DimOperation(DimOp.ArgMax, dim);
    public Tensor Norm(double p = 2) => Reduce(2, [], false, p);
    public Tensor Norm(double p, long[] dims, bool keepDim = false) => Reduce(2, dims, keepDim, p);
    public Tensor Softmax(long dim) => DimOperation(DimOp.Softmax, dim);
    public Tensor LogSoftmax(long dim) => DimOperation(DimOp.LogSoftmax, dim);

    public (Tensor Values, Tensor Indices) TopK(long k, long dim = -1, bool largest = true)
    {
        IntPtr v, i;
        Native.Check(Native.ft_topk(Handle, k, dim, largest ? 1 : 0, &v, &i));
        GC.KeepAlive(this);
        return (Wrap(v), Wrap(i));
    }

    // ------------------------------------------------------------------ comparisons and selection
    public Tensor Eq(Tensor other) => Binary(other, BinaryOp.Eq);
    public Tensor Ne(Tensor other) => Binary(other, BinaryOp.Ne);
    public Tensor Lt(Tensor other) => Binary(other, BinaryOp.Lt);
    public Tensor Le(Tensor other) => Binary(other, BinaryOp.Le);
    public Tensor Gt(Tensor other) => Binary(other, BinaryOp.Gt);
    public Tensor Ge(Tensor other) => Binary(other, BinaryOp.Ge);
    public Tensor Eq(double other) => ScalarBinary(other, ScalarOp.Eq);
    public Tensor Ne(double other) => ScalarBinary(other, ScalarOp.Ne);
    public Tensor Lt(double other) => ScalarBinary(other, ScalarOp.Lt);
    public Tensor Le(double other) => ScalarBinary(other, ScalarOp.Le);
    public Tensor Gt(double other) => ScalarBinary(other, ScalarOp.Gt);
    public Tensor Ge(double other) => ScalarBinary(other, ScalarOp.Ge);
    public Tensor LogicalNot() => Unary(UnaryOp.LogicalNot);

    public static Tensor Where(Tensor cond, Tensor a, Tensor b)
    {
        var r = Wrap(Native.ft_where(cond.Handle, a.Handle, b.Handle));
        GC.KeepAlive(cond);
        GC.KeepAlive(a);
        GC.KeepAlive(b);
        return r;
    }

    public Tensor MaskedFill(Tensor mask, double value)
    {
        var r = Wrap(Native.ft_masked_fill(Handle, mask.Handle, value));
        GC.KeepAlive(this);
        GC.KeepAlive(mask);
        return r;
    }

    public Tensor Tril(long diagonal = 0) => DimOperation(DimOp.Tril, diagonal);
    public Tensor Triu(long diagonal = 0) => DimOperation(DimOp.Triu, diagonal);

    public bool AllClose(Tensor other, double rtol = 1e-5, double atol = 1e-8)
    {
        int r;
        Native.Check(Native.ft_allclose(Handle, other.Handle, rtol, atol, &r));
        GC.KeepAlive(this);
        GC.KeepAlive(other);
        return r != 0;
    }

    // ------------------------------------------------------------------ in place
    private Tensor Inplace(InplaceOp op, Tensor? other = null, double s1 = 0, double s2 = 0, Generator? gen = null)
    {
        Native.Check(Native.ft_inplace(Handle, (int)op, other?.Handle ?? IntPtr.Zero, s1, s2, gen?.Handle ?? IntPtr.Zero));
        GC.KeepAlive(other);
        GC.KeepAlive(gen);
        return this;
    }

    public Tensor Zero_() => Inplace(InplaceOp.Zero);
    public Tensor Fill_(double value) => Inplace(InplaceOp.Fill, s1: value);
    public Tensor Copy_(Tensor src) => Inplace(InplaceOp.Copy, src);
    public Tensor Add_(Tensor other, double alpha = 1) => Inplace(InplaceOp.Add, other, alpha);
    public Tensor Mul_(double value) => Inplace(InplaceOp.Mul, s1: value);
    public Tensor Uniform_(double from, double to, Generator? gen = null) => Inplace(InplaceOp.Uniform, null, from, to, gen);
    public Tensor Normal_(double mean, double std, Generator? gen = null) => Inplace(InplaceOp.Normal, null, mean, std, gen);

    // ------------------------------------------------------------------ autograd
    public void Backward(Tensor? gradient = null, bool retainGraph = false)
    {
        Native.Check(Native.ft_backward(Handle, gradient?.Handle ?? IntPtr.Zero, retainGraph ? 1 : 0));
        GC.KeepAlive(this);
        GC.KeepAlive(gradient);
    }

    // ---- begin: multi-root backward (VB-LoRA) ----
    /// <summary>One autograd pass from several roots with their incoming gradients (torch.autograd.backward(tensors,
    /// grad_tensors)); a null gradient skips its root.</summary>
    public static void Backward(IReadOnlyList<Tensor> roots, IReadOnlyList<Tensor?> gradients, bool retainGraph = false)
    {
        if (roots.Count != gradients.Count) throw new ArgumentException($"{roots.Count} roots but {gradients.Count} gradients");
        var r = new IntPtr[roots.Count];
        var g = new IntPtr[roots.Count];
        for (var i = 0; i < r.Length; i++)
        {
            r[i] = roots[i].Handle;
            g[i] = gradients[i]?.Handle ?? IntPtr.Zero;
        }
        fixed (IntPtr* pr = r, pg = g) Native.Check(Native.ft_backward_many(pr, pg, r.Length, retainGraph ? 1 : 0));
        GC.KeepAlive(roots);
        GC.KeepAlive(gradients);
    }
    // ---- end: multi-root backward ----
}
