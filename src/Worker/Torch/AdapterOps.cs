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
    public static Tensor LoraLinear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, double scaling) =>
        Linear(Native.ft_lora_linear(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero, a.Handle, b.Handle, scaling), x, weight, bias, a, b);

    /// <summary>Whether <see cref="LoraLinearExact"/> runs on <paramref name="device"/>: CUDA, with the shim's kernels, on
    /// libtorch ≥ 2.8.</summary>
    public static bool LoraLinearExactAvailable(Device device) => device.Kind == DeviceKind.Cuda ? ExactOnCuda.Value : ExactOnCpu.Value;

    // Asked by every adapted module in every forward: read from the shim once per device kind.
    private static readonly Lazy<bool> ExactOnCuda = new(() => ExactAvailable(Device.Cuda()));
    private static readonly Lazy<bool> ExactOnCpu = new(() => ExactAvailable(Device.Cpu));

    private static bool ExactAvailable(Device device)
    {
        Native.EnsureLoaded();
        return Native.ft_lora_linear_exact_available(device.NativeType) != 0;
    }

    /// <summary>Whether fp32 adapter math (adapter tensors of <paramref name="adapterDType"/>) on <paramref name="x"/> takes
    /// <see cref="LoraLinearExact"/>: fp32 adapters over a bf16 input where the node is available.</summary>
    public static bool LoraLinearExactApplies(Tensor x, ScalarType adapterDType) =>
        adapterDType == ScalarType.Float32 && x.DType == ScalarType.BFloat16 && LoraLinearExactAvailable(x.Device);

    /// <summary>
    /// The same y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with fp32 adapter math (adapterDtype fp32) over a bf16 base, without fp32
    /// copies of x or of the upstream gradient: each fp32 operand is split into three bf16 terms that sum to it exactly
    /// and the GEMMs run on bf16 tensor cores with fp32 outputs, so x Aᵀ and the gradients of A and B are fp32 GEMMs'
    /// values up to accumulation order; the bf16 output and input gradient carry the adapter's share to ~16 bits before
    /// their one rounding. x and W bf16 on CUDA, A (r, in) and B (out, r) fp32; see <see cref="LoraLinearExactAvailable"/>.
    /// <paramref name="aExactInBf16"/> promises that A's values are bf16 numbers (Bone's one-hot chunk sum): A is then
    /// used as one term instead of three.
    /// </summary>
    public static Tensor LoraLinearExact(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, double scaling, bool aExactInBf16 = false) =>
        Linear(Native.ft_lora_linear_exact(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero, a.Handle, b.Handle, scaling, aExactInBf16 ? 1 : 0),
            x, weight, bias, a, b);

    /// <summary>
    /// DoRA's y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with fp32 adapter math over a bf16 base, f (out) fp32 = m / ‖W + s·B·A‖
    /// (autograd carries m's gradient through it). The frozen product (bf16, as PEFT's base output) and the adapter's
    /// (<see cref="LoraLinearExact"/>'s split products) are summed and scaled by f in fp32 and rounded once, so changes of
    /// f below bf16's resolution still move y as in PEFT. In backward the frozen GEMM takes bf16(gy ⊙ f), as PEFT's base
    /// output does, and the adapter path puts f on B, so A's and B's gradients are fp32 values; f's is Σ_tokens gy ⊙ y/f
    /// from the saved bf16 output (one deterministic kernel). No fp32 copy of x or of a (tokens × features) tensor is
    /// kept. Available where <see cref="LoraLinearExactAvailable"/> is.
    /// </summary>
    public static Tensor DoraLinearExact(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, Tensor f, double scaling)
    {
        var r = Linear(Native.ft_dora_linear_exact(x.Handle, weight.Handle, bias?.Handle ?? IntPtr.Zero, a.Handle, b.Handle, f.Handle, scaling),
            x, weight, bias, a, b);
        GC.KeepAlive(f);
        return r;
    }

    // Wraps a native result; the inputs stay reachable until the native call has returned.
    private static Tensor Linear(IntPtr handle, Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b)
    {
        var r = Tensor.Wrap(handle);
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        GC.KeepAlive(bias);
        GC.KeepAlive(a);
        GC.KeepAlive(b);
        return r;
    }
}
