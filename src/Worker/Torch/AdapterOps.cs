namespace FineTune.Worker.Torch;

/// <summary>How Bat's r×r blocks share their trainable block D.</summary>
public enum BatGrouping
{
    /// <summary>One D per output block (PEFT MiSS <c>init_weights="bat"</c>): D (out/r, r, r), W'_{o,a} = W_{o,a}(I + D_o) + D_o.</summary>
    Col = 0,
    /// <summary>One D per input block (ours): D (in/r, r, r), W'_{o,a} = (I + D_a)W_{o,a} + D_a.</summary>
    Row = 1,
}

/// <summary>Fused operators for adapter methods whose cheap form is not a composition of plain ops.</summary>
public static class AdapterOps
{
    /// <summary>
    /// y = x·W'ᵀ + b with W' = W + ΔW_bat(W, D), as one autograd node: W' is built in W's dtype for the product and
    /// freed; backward keeps only x and D (W is frozen) and rebuilds W'. x and W share a dtype; D may be fp32 (its
    /// gradient comes back in its own dtype). W must not require grad.
    /// </summary>
    public static Tensor BatLinear(Tensor x, Tensor weight, Tensor? bias, Tensor block, BatGrouping grouping)
    {
        var r = Tensor.Wrap(Native.ft_bat_linear(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero, block.Handle, (int)grouping));
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        GC.KeepAlive(bias);
        GC.KeepAlive(block);
        return r;
    }

    /// <summary>
    /// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd node over a frozen W: the LoRA GEMM adds into the base output, and in
    /// backward the adapter's share of x's gradient is added inside the GEMM (no separate tensors or sums). x and W
    /// share a dtype; A (r, in) and B (out, r) may be wider (fp32 masters): they are cast for the products and their
    /// gradients come back in their own dtype.
    /// </summary>
    public static Tensor LoraLinear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, double scaling)
    {
        var r = Tensor.Wrap(Native.ft_lora_linear(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero, a.Handle, b.Handle, scaling));
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        GC.KeepAlive(bias);
        GC.KeepAlive(a);
        GC.KeepAlive(b);
        return r;
    }
}
