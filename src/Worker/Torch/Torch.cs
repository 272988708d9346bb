using System.Runtime.InteropServices;

namespace FineTune.Worker.Torch;

public static class Torch
{
    public static string Version
    {
        get { Native.EnsureLoaded(); return Marshal.PtrToStringUTF8(Native.ft_version()) ?? "?"; }
    }

    /// <summary>Seeds the CPU generator and every CUDA device's default generator.</summary>
    public static void ManualSeed(long seed) { Native.EnsureLoaded(); Native.Check(Native.ft_manual_seed(seed)); }

    /// <summary>Seeds only <paramref name="device"/>'s default generator (the CPU one for the CPU), so that a job
    /// reseeding its GPU does not disturb the jobs running on the node's other GPUs.</summary>
    public static void ManualSeed(long seed, Device device)
    {
        Native.EnsureLoaded();
        Native.Check(Native.ft_manual_seed_device(seed, device.NativeType, device.Index));
    }

    public static void SetNumThreads(int n) { Native.EnsureLoaded(); Native.Check(Native.ft_set_num_threads(n)); }

    public static int NumThreads { get { Native.EnsureLoaded(); return Native.ft_get_num_threads(); } }

    /// <summary>Disables autograd on this thread until disposed (restores the previous mode).</summary>
    public static IDisposable NoGrad() => new GradMode(false);

    /// <summary>Enables autograd on this thread until disposed.</summary>
    public static IDisposable EnableGrad() => new GradMode(true);

    public static bool IsGradEnabled { get { Native.EnsureLoaded(); return Native.ft_is_grad_enabled() != 0; } }

    private sealed class GradMode : IDisposable
    {
        private readonly int _previous;
        private bool _disposed;
        public GradMode(bool on) { Native.EnsureLoaded(); _previous = Native.ft_set_grad_enabled(on ? 1 : 0); }
        public void Dispose()
        {
            if (_disposed) return;
            _disposed = true;
            Native.ft_set_grad_enabled(_previous);
        }
    }
}

public sealed class Generator : IDisposable
{
    private IntPtr _handle;

    public Generator(long seed, Device? device = null)
    {
        Native.EnsureLoaded();
        var d = device ?? Device.Cpu;
        _handle = Native.Check(Native.ft_generator_new(seed, d.NativeType, d.Index));
        Seed = seed;
        Device = d;
    }

    public long Seed { get; }
    public Device Device { get; }

    internal IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(Generator));

    public void Dispose()
    {
        var h = Interlocked.Exchange(ref _handle, IntPtr.Zero);
        if (h != IntPtr.Zero) Native.ft_generator_free(h);
        GC.SuppressFinalize(this);
    }

    ~Generator() { Dispose(); }
}

public static class Cuda
{
    public static bool IsAvailable() { Native.EnsureLoaded(); return Native.ft_cuda_is_available() != 0; }
    public static int DeviceCount() { Native.EnsureLoaded(); return Native.ft_cuda_device_count(); }
    /// <summary>Whether the shim was compiled against a CUDA libtorch (memory statistics are 0 otherwise).</summary>
    public static bool IsCudaBuild { get { Native.EnsureLoaded(); return Native.ft_has_cuda_build() != 0; } }
    /// <summary>Whether the shim was built with its own CUDA kernels (fused_kernels.cu: <see cref="F.Rotary"/> and
    /// <see cref="F.SwiGlu"/> run one kernel each way on CUDA, <see cref="F.LinearCrossEntropy"/> one per chunk, and
    /// <see cref="AdapterOps.LoraLinearExact"/> exists); false: those ops run their composite libtorch version.</summary>
    public static bool FusedKernelsAvailable { get { Native.EnsureLoaded(); return Native.ft_fused_kernels_available() != 0; } }
    public static void Synchronize(int device = -1) { Native.EnsureLoaded(); Native.Check(Native.ft_cuda_synchronize(device)); }
    public static long MemoryAllocated(int device = 0) { Native.EnsureLoaded(); return Native.Check(Native.ft_cuda_memory_stat(device, 0)); }
    public static long MaxMemoryAllocated(int device = 0) { Native.EnsureLoaded(); return Native.Check(Native.ft_cuda_memory_stat(device, 1)); }
    public static void ResetPeakMemoryStats(int device = 0) { Native.EnsureLoaded(); Native.Check(Native.ft_cuda_reset_peak(device)); }
    public static void EmptyCache() { Native.EnsureLoaded(); Native.Check(Native.ft_cuda_empty_cache()); }
    /// <summary>Makes <paramref name="device"/> the calling thread's current CUDA device (a no-op without CUDA).
    /// Thread-local, like libtorch's: code that awaits must set it again on the thread it resumes on.</summary>
    public static void SetDevice(int device) { Native.EnsureLoaded(); Native.Check(Native.ft_cuda_set_device(device)); }
    /// <summary>The calling thread's current CUDA device (0 without CUDA).</summary>
    public static int CurrentDevice() { Native.EnsureLoaded(); return Native.Check(Native.ft_cuda_current_device()); }
}
