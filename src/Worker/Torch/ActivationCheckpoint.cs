using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace FineTune.Worker.Torch;

/// <summary>
/// Activation (gradient) checkpointing: <see cref="Run"/> evaluates a registered function without keeping its
/// intermediate activations; backward evaluates it again with autograd on (same RNG state, so the same dropout masks)
/// and backpropagates through that second graph. Memory drops from every intermediate of the function to its inputs,
/// at the price of a second forward. Gradients are those of the plain run (tests compare them).
/// <para>
/// The native side is a libtorch autograd Function that calls back into C# through a function pointer. The callback
/// may run on one of autograd's threads (CUDA backward runs on a per-device thread), so a function must not depend on
/// thread-local state of the caller except libtorch's own (grad mode is set by the native side), and any tensor it
/// needs but does not receive as an input must stay alive until backward. Tensors the function creates are freed when
/// it returns (a dispose scope per call); its outputs are handed to libtorch.
/// </para>
/// </summary>
public static unsafe class ActivationCheckpoint
{
    private const int MaxOutputs = 16;
    private static readonly ConcurrentDictionary<long, Func<Tensor[], Tensor[]>> Functions = new();
    private static long _next;

    static ActivationCheckpoint()
    {
        Native.EnsureLoaded();
        Native.ft_set_checkpoint_callback(&Callback);
    }

    /// <summary>Registers a function for <see cref="Run"/>; the id stays valid until <see cref="Unregister"/>.
    /// A module registers once (not per call), so nothing accumulates when a forward is never backpropagated.</summary>
    public static long Register(Func<Tensor[], Tensor[]> fn)
    {
        var id = Interlocked.Increment(ref _next);
        Functions[id] = fn;
        return id;
    }

    public static void Unregister(long id) => Functions.TryRemove(id, out _);

    private static long _recomputations;

    /// <summary>How many times a checkpointed function has been run again in backward, process-wide (diagnostics).</summary>
    public static long Recomputations => Interlocked.Read(ref _recomputations);

    /// <summary>
    /// Runs function <paramref name="id"/> on <paramref name="inputs"/> under checkpointing when autograd is on (when
    /// it is off, plainly: nothing would be kept anyway).
    /// </summary>
    public static Tensor[] Run(long id, params Tensor[] inputs)
    {
        if (!Functions.TryGetValue(id, out var fn)) throw new ArgumentException($"no checkpointed function with id {id}", nameof(id));
        if (!Torch.IsGradEnabled) return fn(inputs);
        var handles = new IntPtr[inputs.Length];
        for (var i = 0; i < inputs.Length; i++) handles[i] = inputs[i].Handle;
        var outputs = stackalloc IntPtr[MaxOutputs];
        int n;
        fixed (IntPtr* h = handles) n = Native.Check(Native.ft_checkpoint(id, h, handles.Length, outputs, MaxOutputs));
        GC.KeepAlive(inputs);
        var result = new Tensor[n];
        for (var i = 0; i < n; i++) result[i] = Tensor.Wrap(outputs[i]);
        return result;
    }

    [UnmanagedCallersOnly]
    private static int Callback(long id, IntPtr* inputs, int n, IntPtr* outputs, int cap)
    {
        try
        {
            using var scope = DisposeScope.Begin();
            var xs = new Tensor[n];
            for (var i = 0; i < n; i++) xs[i] = Tensor.Wrap(inputs[i]);   // the scope owns (and frees) these handles
            if (!Functions.TryGetValue(id, out var fn)) throw new InvalidOperationException($"checkpointed function {id} was unregistered before backward");
            if (Torch.IsGradEnabled) Interlocked.Increment(ref _recomputations);
            var ys = fn(xs);
            if (ys.Length > cap) throw new InvalidOperationException($"a checkpointed function returned {ys.Length} tensors (at most {cap})");
            for (var i = 0; i < ys.Length; i++) outputs[i] = Native.Check(Native.ft_alias(ys[i].Handle));
            return ys.Length;
        }
        catch (Exception e)
        {
            // An exception must not cross the native frames: report it through the shim's error slot instead.
            SetError($"{e.GetType().Name} in a checkpointed function: {e.Message}");
            return -1;
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void SetError(string message)
    {
        var bytes = Encoding.UTF8.GetBytes(message + "\0");
        fixed (byte* p = bytes) Native.ft_set_error(p);
    }
}
