using System.Reflection;
using System.Runtime.InteropServices;

namespace FineTune.Worker.Torch;

/// <summary>P/Invoke surface of libfinetune_torch.so. Blittable signatures only, so calls need no marshalling stubs.</summary>
internal static unsafe class Native
{
    internal const string Lib = "finetune_torch";

    static Native()
    {
        NativeLibrary.SetDllImportResolver(typeof(Native).Assembly, Resolve);
        // Debian's libtorch 1.13 runs on one thread unless told otherwise.
        if (string.IsNullOrEmpty(Environment.GetEnvironmentVariable("OMP_NUM_THREADS")))
            ft_set_num_threads(Environment.ProcessorCount);
    }

    /// <summary>Forces the static constructor (resolver registration) before the first call.</summary>
    internal static void EnsureLoaded() { }

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
    {
        if (name != Lib) return IntPtr.Zero;
        var tried = new List<string>();
        foreach (var candidate in Candidates())
        {
            tried.Add(candidate);
            if (File.Exists(candidate)) return NativeLibrary.Load(candidate);
        }
        throw new DllNotFoundException(
            $"libfinetune_torch.so not found (build it with `source scripts/lib.sh && build_native` or set FINETUNE_TORCH_NATIVE); tried: {string.Join(", ", tried)}");
    }

    private static IEnumerable<string> Candidates()
    {
        var env = Environment.GetEnvironmentVariable("FINETUNE_TORCH_NATIVE");
        if (!string.IsNullOrEmpty(env)) yield return env;
        yield return Path.Combine(AppContext.BaseDirectory, "libfinetune_torch.so");
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
            yield return Path.Combine(dir.FullName, "build", "native", "libfinetune_torch.so");
    }

    internal static string LastError()
    {
        var msg = Marshal.PtrToStringUTF8(ft_last_error()) ?? "unknown libtorch error";
        return msg.TrimEnd();
    }

    internal static IntPtr Check(IntPtr handle) => handle != IntPtr.Zero ? handle : throw new TorchException(LastError());
    internal static int Check(int rc) => rc >= 0 ? rc : throw new TorchException(LastError());
    internal static long Check(long rc) => rc >= 0 ? rc : throw new TorchException(LastError());

    [DllImport(Lib)] internal static extern IntPtr ft_last_error();
    [DllImport(Lib)] internal static extern IntPtr ft_version();
    [DllImport(Lib)] internal static extern int ft_has_cuda_build();
    [DllImport(Lib)] internal static extern void ft_free(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_manual_seed(long seed);
    [DllImport(Lib)] internal static extern int ft_set_num_threads(int n);
    [DllImport(Lib)] internal static extern int ft_get_num_threads();
    [DllImport(Lib)] internal static extern int ft_set_grad_enabled(int on);
    [DllImport(Lib)] internal static extern int ft_is_grad_enabled();

    [DllImport(Lib)] internal static extern IntPtr ft_generator_new(long seed, int devtype, int devindex);
    [DllImport(Lib)] internal static extern void ft_generator_free(IntPtr g);

    [DllImport(Lib)] internal static extern int ft_cuda_is_available();
    [DllImport(Lib)] internal static extern int ft_cuda_device_count();
    [DllImport(Lib)] internal static extern int ft_cuda_synchronize(int device);
    [DllImport(Lib)] internal static extern long ft_cuda_memory_stat(int device, int kind);
    [DllImport(Lib)] internal static extern int ft_cuda_reset_peak(int device);
    [DllImport(Lib)] internal static extern int ft_cuda_empty_cache();

    [DllImport(Lib)] internal static extern IntPtr ft_factory(int kind, long* shape, int ndim, double value, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_arange(double start, double end, double step, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_random(int kind, long* shape, int ndim, IntPtr gen, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_randint(long low, long high, long* shape, int ndim, IntPtr gen, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_randperm(long n, IntPtr gen, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_from_data(void* data, long nbytes, long* shape, int ndim, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_scalar(double value, int dtype, int devtype, int devindex);

    [DllImport(Lib)] internal static extern int ft_dim(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_shape(IntPtr t, long* output, int cap);
    [DllImport(Lib)] internal static extern long ft_numel(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_dtype(IntPtr t);
    [DllImport(Lib)] internal static extern long ft_element_size(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_device(IntPtr t, int* index);
    [DllImport(Lib)] internal static extern int ft_requires_grad(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_set_requires_grad(IntPtr t, int on);
    [DllImport(Lib)] internal static extern int ft_is_contiguous(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_is_leaf(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_grad(IntPtr t, IntPtr* output);
    [DllImport(Lib)] internal static extern int ft_copy_to(IntPtr t, void* dst, long nbytes);
    [DllImport(Lib)] internal static extern int ft_item_double(IntPtr t, double* output);
    [DllImport(Lib)] internal static extern int ft_item_long(IntPtr t, long* output);
    [DllImport(Lib)] internal static extern int ft_item_bool(IntPtr t, int* output);
    [DllImport(Lib)] internal static extern int ft_allclose(IntPtr a, IntPtr b, double rtol, double atol, int* output);

    [DllImport(Lib)] internal static extern IntPtr ft_to(IntPtr t, int dtype, int devtype, int devindex, int nonBlocking);
    [DllImport(Lib)] internal static extern IntPtr ft_unary(IntPtr a, int op);
    [DllImport(Lib)] internal static extern IntPtr ft_binary(IntPtr a, IntPtr b, int op, double alpha);
    [DllImport(Lib)] internal static extern IntPtr ft_binary_scalar(IntPtr a, double s, int op);
    [DllImport(Lib)] internal static extern IntPtr ft_clamp(IntPtr a, double min, int hasMin, double max, int hasMax);
    [DllImport(Lib)] internal static extern IntPtr ft_dimop(IntPtr a, int op, long p0, long p1, long p2);
    [DllImport(Lib)] internal static extern IntPtr ft_shapeop(IntPtr a, int op, long* shape, int n);
    [DllImport(Lib)] internal static extern int ft_split(IntPtr a, int kind, long arg, long dim, IntPtr* output, int cap);
    [DllImport(Lib)] internal static extern IntPtr ft_cat(IntPtr* ts, int n, long dim, int stack);
    [DllImport(Lib)] internal static extern IntPtr ft_index(IntPtr a, int op, long dim, IntPtr idx, IntPtr src);
    [DllImport(Lib)] internal static extern IntPtr ft_pad(IntPtr a, long* pad, int n, double value);
    [DllImport(Lib)] internal static extern IntPtr ft_reduce(IntPtr a, int op, long* dims, int n, int keepdim, double p);
    [DllImport(Lib)] internal static extern int ft_max_dim(IntPtr a, long dim, int keepdim, IntPtr* values, IntPtr* indices);
    [DllImport(Lib)] internal static extern int ft_topk(IntPtr a, long k, long dim, int largest, IntPtr* values, IntPtr* indices);
    [DllImport(Lib)] internal static extern IntPtr ft_where(IntPtr c, IntPtr a, IntPtr b);
    [DllImport(Lib)] internal static extern IntPtr ft_masked_fill(IntPtr a, IntPtr mask, double value);
    [DllImport(Lib)] internal static extern int ft_inplace(IntPtr a, int op, IntPtr other, double s1, double s2, IntPtr gen);
    [DllImport(Lib)] internal static extern int ft_backward(IntPtr a, IntPtr grad, int retainGraph);
    // ---- begin: multi-root backward (VB-LoRA) ----
    [DllImport(Lib)] internal static extern int ft_backward_many(IntPtr* roots, IntPtr* grads, int n, int retainGraph);
    // ---- end: multi-root backward ----

    [DllImport(Lib)] internal static extern IntPtr ft_linear(IntPtr x, IntPtr w, IntPtr b);
    [DllImport(Lib)] internal static extern IntPtr ft_embedding(IntPtr w, IntPtr ids);
    [DllImport(Lib)] internal static extern IntPtr ft_cross_entropy(IntPtr logits, IntPtr targets, long ignoreIndex, int reduction);
    [DllImport(Lib)] internal static extern IntPtr ft_sdpa(IntPtr q, IntPtr k, IntPtr v, IntPtr mask, int isCausal, double dropoutP);
    [DllImport(Lib)] internal static extern IntPtr ft_rms_norm(IntPtr x, IntPtr w, double eps);
    [DllImport(Lib)] internal static extern IntPtr ft_dropout(IntPtr x, double p, int training);
    [DllImport(Lib)] internal static extern IntPtr ft_dropout_seeded(IntPtr x, double p, long seed);
    [DllImport(Lib)] internal static extern int ft_svd(IntPtr a, int full, IntPtr* u, IntPtr* s, IntPtr* vh);
    [DllImport(Lib)] internal static extern int ft_qr(IntPtr a, int reduced, IntPtr* q, IntPtr* r);

    [DllImport(Lib)] internal static extern int ft_adamw_step(IntPtr* ps, IntPtr* m, IntPtr* v, int n, double lr, double beta1, double beta2, double eps, double weightDecay, long step);
    [DllImport(Lib)] internal static extern int ft_sgd_step(IntPtr* ps, IntPtr* bufs, int n, double lr, double momentum, double weightDecay, int first);
    [DllImport(Lib)] internal static extern int ft_zero_grad(IntPtr* ps, int n);
    [DllImport(Lib)] internal static extern int ft_clip_grad_norm(IntPtr* ps, int n, double maxNorm, double* total);

    // ---- adapter operators (bone-family): AdapterOps.cs
    [DllImport(Lib)] internal static extern IntPtr ft_bat_linear(IntPtr x, IntPtr w, IntPtr b, IntPtr d, int grouping);
    [DllImport(Lib)] internal static extern IntPtr ft_lora_linear(IntPtr x, IntPtr w, IntPtr b, IntPtr a, IntPtr bm, double s);
    [DllImport(Lib)] internal static extern IntPtr ft_lora_linear_exact(IntPtr x, IntPtr w, IntPtr b, IntPtr a, IntPtr bm, double s, int aExact);
    [DllImport(Lib)] internal static extern int ft_lora_linear_exact_available(int deviceType);
    [DllImport(Lib)] internal static extern IntPtr ft_dora_linear_exact(IntPtr x, IntPtr w, IntPtr b, IntPtr a, IntPtr bm, IntPtr f, double s);
    // ---- end adapter operators (bone-family)
    // ---------------------------------------------------------------- gpu-perf: training-path performance
    [DllImport(Lib)] internal static extern int ft_cuda_set_device(int index);
    [DllImport(Lib)] internal static extern int ft_cuda_current_device();
    [DllImport(Lib)] internal static extern int ft_manual_seed_device(long seed, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_alias(IntPtr t);
    [DllImport(Lib)] internal static extern int ft_set_data(IntPtr t, IntPtr data);
    [DllImport(Lib)] internal static extern IntPtr ft_sum_dtype(IntPtr a, long* dims, int n, int keepdim, int dtype);
    [DllImport(Lib)] internal static extern IntPtr ft_from_data_async(void* data, long nbytes, long* shape, int ndim, int dtype, int devtype, int devindex);
    [DllImport(Lib)] internal static extern IntPtr ft_sdpa_gqa(IntPtr q, IntPtr k, IntPtr v, IntPtr mask, int isCausal, double dropoutP);
    [DllImport(Lib)] internal static extern IntPtr ft_linear_cross_entropy(IntPtr hidden, IntPtr weight, IntPtr targets, long ignoreIndex, long chunk);
    [DllImport(Lib)] internal static extern void ft_set_checkpoint_callback(delegate* unmanaged<long, IntPtr*, int, IntPtr*, int, int> callback);
    [DllImport(Lib)] internal static extern void ft_set_error(byte* message);
    [DllImport(Lib)] internal static extern int ft_checkpoint(long fn, IntPtr* inputs, int n, IntPtr* outputs, int cap);
    [DllImport(Lib)] internal static extern int ft_clip_grad_norm_async(IntPtr* ps, int n, double maxNorm);
    // ---------------------------------------------------------------- end gpu-perf
    // ---- fused elementwise ops (rotary, SwiGLU)
    [DllImport(Lib)] internal static extern int ft_fused_kernels_available();
    [DllImport(Lib)] internal static extern IntPtr ft_rotary(IntPtr x, IntPtr cos, IntPtr sin);
    [DllImport(Lib)] internal static extern IntPtr ft_swiglu(IntPtr gate, IntPtr up);
    // ---- end fused elementwise ops
}
