using FineTune.Worker.Torch;

namespace FineTune.Worker.Training.Methods;

/// <summary>
/// An adapter's input in the adapter tensors' dtype. On a bf16 base with fp32 adapters every adapted module casts its
/// input to fp32, and several modules share one input (q, k and v; gate and up): the cast of the most recent input
/// is reused, so it is computed, and kept for backward, once per distinct input instead of once per module. Same
/// values as a cast per module.
/// </summary>
public static class AdapterInput
{
    // Per thread: checkpointed layers are recomputed on autograd's threads.
    [ThreadStatic] private static Tensor? _source;
    [ThreadStatic] private static Tensor? _cast;

    public static Tensor As(Tensor x, ScalarType dtype)
    {
        if (x.DType == dtype) return x;
        if (ReferenceEquals(x, _source) && _cast is { IsDisposed: false } cached && cached.DType == dtype) return cached;
        var cast = x.To(dtype);
        (_source, _cast) = (x, cast);
        return cast;
    }

    /// <summary>(h Aᵀ) Bᵀ in h's dtype, A and B cast for the products (the composed form of adapterDtype mixed; their
    /// gradients come back in their own dtype through the casts).</summary>
    public static Tensor LowRank(Tensor h, Tensor a, Tensor b) => F.Linear(F.Linear(h, a.To(h.DType)), b.To(h.DType));

    /// <summary>baseOutput + delta, in baseOutput's dtype. When delta is wider (fp32 adapter math over a bf16 base) the
    /// sum is made in place, in delta's precision and rounded once, as PEFT's <c>result + lora</c> then <c>.to(dtype)</c>
    /// rounds it: no fp32 (tokens × out) sum and cast of it per module, and in backward no fp32 copy of the upstream
    /// gradient for the base path (a 1B model's fp32-math step spent ~10% of its time in those passes). baseOutput must
    /// be a fresh product that no autograd node keeps (a base linear's output is one: its backward keeps its inputs).</summary>
    public static Tensor AddInto(Tensor baseOutput, Tensor delta) =>
        baseOutput.DType == delta.DType ? baseOutput + delta : baseOutput.Add_(delta);

    /// <summary>(h Aᵀ)(s·B)ᵀ: LoRA's product with the scale folded into B (out × r) rather than applied to the
    /// (tokens × out) result, one elementwise pass fewer each way; the values differ from s·((h Aᵀ) Bᵀ) by fp32 rounding.</summary>
    public static Tensor ScaledLowRank(Tensor h, Tensor a, Tensor b, double scale) =>
        F.Linear(F.Linear(h, a), scale == 1 ? b : b * scale);
}
