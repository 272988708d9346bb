namespace FineTune.Worker.Torch;

/// <summary>Neural-network functions (torch.nn.functional equivalents).</summary>
public static class F
{
    public static Tensor Linear(Tensor x, Tensor weight, Tensor? bias = null) =>
        Call(Native.ft_linear(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero), x, weight, bias);

    public static Tensor Embedding(Tensor weight, Tensor ids) => Call(Native.ft_embedding(weight.Handle, ids.Handle), weight, ids);

    /// <summary>logits (N, C), targets (N) Int64; targets equal to <paramref name="ignoreIndex"/> do not count.</summary>
    public static Tensor CrossEntropy(Tensor logits, Tensor targets, long ignoreIndex = -100, string reduction = "mean")
    {
        var r = reduction switch
        {
            "none" => 0, "mean" => 1, "sum" => 2,
            _ => throw new ArgumentException($"reduction must be mean, sum or none, not '{reduction}'", nameof(reduction)),
        };
        return Call(Native.ft_cross_entropy(logits.Handle, targets.Handle, ignoreIndex, r), logits, targets);
    }

    /// <summary>
    /// softmax(q·kᵀ/√d + mask)·v with q,k,v (B, H, T, D). A Bool mask marks positions that may be attended;
    /// a float mask is added to the scores. libtorch 2.x runs its fused kernels; 1.13 runs the composed math.
    /// </summary>
    public static Tensor ScaledDotProductAttention(Tensor q, Tensor k, Tensor v, Tensor? mask = null, bool isCausal = false, double dropoutP = 0) =>
        Call(Native.ft_sdpa(q.Handle, k.Handle, v.Handle, mask?.Handle ?? IntPtr.Zero, isCausal ? 1 : 0, dropoutP), q, k, v, mask);

    /// <summary>
    /// Grouped-query attention: q (B, H, T, D), k and v (B, Hkv, T, D) with H a multiple of Hkv; query head h attends
    /// with kv head h / (H/Hkv) (HF's repeat_kv). libtorch ≥ 2.5 runs it inside the fused kernels (enable_gqa) without
    /// materialising the repeated k and v; older versions repeat them first.
    /// </summary>
    public static Tensor GroupedQueryAttention(Tensor q, Tensor k, Tensor v, Tensor? mask = null, bool isCausal = false, double dropoutP = 0) =>
        Call(Native.ft_sdpa_gqa(q.Handle, k.Handle, v.Handle, mask?.Handle ?? IntPtr.Zero, isCausal ? 1 : 0, dropoutP), q, k, v, mask);

    /// <summary>
    /// Σ over rows with targets ≠ <paramref name="ignoreIndex"/> of cross-entropy(hidden · weightᵀ, targets), in fp32:
    /// hidden (N, H), weight (V, H), targets (N) Int64. Computed <paramref name="chunkRows"/> rows at a time (0: about
    /// 256 MB of fp32 logits per chunk), and under autograd it keeps only d/d(hidden) (computed in the forward), never
    /// the (N, V) logits: the memory of a big-vocabulary loss drops from several times N·V·4 bytes to N·H.
    /// </summary>
    public static Tensor LinearCrossEntropy(Tensor hidden, Tensor weight, Tensor targets, long ignoreIndex = -100, long chunkRows = 0) =>
        Call(Native.ft_linear_cross_entropy(hidden.Handle, weight.Handle, targets.Handle, ignoreIndex, chunkRows), hidden, weight, targets);

    /// <summary>weight · x/√(mean(x²)+eps), computed in fp32 (fp64 for fp64 input) and cast back to x's dtype.</summary>
    public static Tensor RmsNorm(Tensor x, Tensor weight, double eps) => Call(Native.ft_rms_norm(x.Handle, weight.Handle, eps), x, weight);

    /// <summary>
    /// HF rotary embedding, x·cos + rotate_half(x)·sin with rotate_half(x) = cat(−x₂, x₁) over the halves of D, on x
    /// (B, T, H, D): the heads-last layout of a projection before its transpose to (B, H, T, D). cos and sin are (T, D),
    /// or (B, T, D) for per-row positions, in x's dtype, broadcast over H; they get no gradient. One autograd node that
    /// saves only cos and sin; one kernel each way on CUDA when <see cref="Cuda.FusedKernelsAvailable"/>.
    /// </summary>
    public static Tensor Rotary(Tensor x, Tensor cos, Tensor sin) => Call(Native.ft_rotary(x.Handle, cos.Handle, sin.Handle), x, cos, sin);

    /// <summary>silu(gate)·up (the SwiGLU of the Llama MLP), gate and up of one shape and dtype. One autograd node that
    /// saves gate and up; one kernel each way on CUDA when <see cref="Cuda.FusedKernelsAvailable"/>.</summary>
    public static Tensor SwiGlu(Tensor gate, Tensor up) => Call(Native.ft_swiglu(gate.Handle, up.Handle), gate, up);

    /// <summary>Dropout from the device's default generator, which every job on the device shares; training uses the
    /// seeded overload below.</summary>
    public static Tensor Dropout(Tensor x, double p, bool training) => Call(Native.ft_dropout(x.Handle, p, training ? 1 : 0), x);

    /// <summary>Dropout whose mask depends on <paramref name="seed"/> alone (a generator made for the call on x's
    /// device), not on the device's shared default generator: concurrent jobs on one device cannot shift each other's
    /// masks, and a recompute with the same seed (activation checkpointing, a resumed run) draws the same mask.
    /// Returns x itself when not training or p = 0.</summary>
    public static Tensor Dropout(Tensor x, double p, bool training, long seed) =>
        !training || p == 0 ? x : Call(Native.ft_dropout_seeded(x.Handle, p, seed), x);

    private static Tensor Call(IntPtr h, Tensor a, Tensor? b = null, Tensor? c = null, Tensor? d = null)
    {
        var r = Tensor.Wrap(h);
        GC.KeepAlive(a);
        GC.KeepAlive(b);
        GC.KeepAlive(c);
        GC.KeepAlive(d);
        return r;
    }
}

public static unsafe class Linalg
{
    public static (Tensor U, Tensor S, Tensor Vh) Svd(Tensor a, bool fullMatrices = false)
    {
        IntPtr u, s, vh;
        Native.Check(Native.ft_svd(a.Handle, fullMatrices ? 1 : 0, &u, &s, &vh));
        GC.KeepAlive(a);
        return (Tensor.Wrap(u), Tensor.Wrap(s), Tensor.Wrap(vh));
    }

    public static (Tensor Q, Tensor R) Qr(Tensor a, bool reduced = true)
    {
        IntPtr q, r;
        Native.Check(Native.ft_qr(a.Handle, reduced ? 1 : 0, &q, &r));
        GC.KeepAlive(a);
        return (Tensor.Wrap(q), Tensor.Wrap(r));
    }

    public static Tensor Inverse(Tensor a) => a.Unary(UnaryOp.Inverse);

    /// <summary>Solves a·x = b.</summary>
    public static Tensor Solve(Tensor a, Tensor b)
    {
        var r = Tensor.Wrap(Native.ft_binary(a.Handle, b.Handle, (int)BinaryOp.Solve, 1));
        GC.KeepAlive(a);
        GC.KeepAlive(b);
        return r;
    }
}
