// Flat C ABI over libtorch's C++ API for the C# binding (FineTune.Worker.Torch).
// Handles are heap-allocated at::Tensor*; every entry point catches every exception, stores the
// message (without the C++ backtrace) in a thread-local buffer and returns null / -1.
// Compiles against libtorch 1.13 (Debian, CPU) and 2.x (CUDA); version differences are guarded below.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/version.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#ifdef FT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#ifdef FT_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include "fused_kernels.h"
#endif

#define FT_API extern "C" __attribute__((visibility("default")))
#define FT_AT_LEAST(maj, min) (TORCH_VERSION_MAJOR > (maj) || (TORCH_VERSION_MAJOR == (maj) && TORCH_VERSION_MINOR >= (min)))

using T = at::Tensor*;

namespace {
thread_local std::string g_error;

void set_error(const char* msg) { g_error = msg ? msg : "unknown error"; }

T wrap(at::Tensor&& t) { return new at::Tensor(std::move(t)); }
T wrap(const at::Tensor& t) { return new at::Tensor(t); }

at::Device device_of(int type, int index) {
  if (type == 1) return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index < 0 ? 0 : index));
  return at::Device(at::kCPU);
}

at::TensorOptions options(int dtype, int devtype, int devindex) {
  return at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)).device(device_of(devtype, devindex));
}

at::IntArrayRef dims(const int64_t* p, int n) { return at::IntArrayRef(p, static_cast<size_t>(n)); }

c10::optional<at::Generator> gen_of(void* g) {
  if (!g) return c10::nullopt;
  return *static_cast<at::Generator*>(g);
}

std::vector<at::Tensor> list(T* ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

// The fused CUDA kernels (fused_kernels.cu) take fp32, fp16 and bf16 CUDA tensors.
#ifdef FT_CUDA_KERNELS
int fused_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FT_FUSED_F32;
    case at::kHalf: return FT_FUSED_F16;
    case at::kBFloat16: return FT_FUSED_BF16;
    default: return -1;
  }
}
bool fused_kernel_for(const at::Tensor& t) { return t.is_cuda() && fused_dtype(t.scalar_type()) >= 0; }
void fused_check(int rc, const char* op) {
  TORCH_CHECK(rc == FT_FUSED_OK, op, ": CUDA kernel failed: ", ft_fused_error_string(rc));
}
#endif
}  // namespace

// Runs the body; on any exception records the message and returns `fail`.
#define FT_TRY(fail, ...)                                         \
  try {                                                           \
    __VA_ARGS__                                                   \
  } catch (const c10::Error& e) {                                 \
    set_error(e.what_without_backtrace());                        \
  } catch (const std::exception& e) {                             \
    set_error(e.what());                                          \
  } catch (...) {                                                 \
    set_error("unknown C++ exception");                           \
  }                                                               \
  return fail;

// ---------------------------------------------------------------- global
FT_API const char* ft_last_error() { return g_error.c_str(); }
FT_API const char* ft_version() { return TORCH_VERSION; }
FT_API int ft_has_cuda_build() {
#ifdef FT_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}
FT_API void ft_free(T t) { delete t; }

FT_API int ft_manual_seed(int64_t seed) {
  FT_TRY(-1, {
    auto cpu = at::detail::getDefaultCPUGenerator();
    {
      std::lock_guard<std::mutex> lock(cpu.mutex());
      cpu.set_current_seed(static_cast<uint64_t>(seed));
    }
    if (at::hasCUDA()) {
      int n = at::detail::getCUDAHooks().getNumGPUs();
      for (int i = 0; i < n; ++i) {
        // Context::defaultGenerator exists in 1.13 and 2.x (the CUDA hooks' accessor was renamed in 2.x).
        auto g = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)));
        std::lock_guard<std::mutex> lock(g.mutex());
        g.set_current_seed(static_cast<uint64_t>(seed));
      }
    }
    return 0;
  })
}
FT_API int ft_set_num_threads(int n) { FT_TRY(-1, { at::set_num_threads(n); return 0; }) }
FT_API int ft_get_num_threads() { return at::get_num_threads(); }
FT_API int ft_set_grad_enabled(int on) {
  bool prev = at::GradMode::is_enabled();
  at::GradMode::set_enabled(on != 0);
  return prev ? 1 : 0;
}
FT_API int ft_is_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// ---------------------------------------------------------------- generators
FT_API void* ft_generator_new(int64_t seed, int devtype, int devindex) {
  FT_TRY(nullptr, {
    at::Generator g;
    if (devtype == 1) {
      g = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(devindex))).clone();
    } else {
      g = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
    }
    g.set_current_seed(static_cast<uint64_t>(seed));
    return static_cast<void*>(new at::Generator(std::move(g)));
  })
}
FT_API void ft_generator_free(void* g) { delete static_cast<at::Generator*>(g); }

// ---------------------------------------------------------------- CUDA
FT_API int ft_cuda_is_available() {
  FT_TRY(0, { return at::hasCUDA() && at::detail::getCUDAHooks().getNumGPUs() > 0 ? 1 : 0; })
}
FT_API int ft_cuda_device_count() {
  FT_TRY(0, { return at::hasCUDA() ? at::detail::getCUDAHooks().getNumGPUs() : 0; })
}
FT_API int ft_cuda_synchronize(int device) {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (!at::hasCUDA()) return 0;
    if (device < 0) {
      c10::cuda::device_synchronize();
    } else {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      c10::cuda::device_synchronize();
    }
#else
    (void)device;
#endif
    return 0;
  })
}
// kind: 0 current allocated, 1 peak allocated
FT_API int64_t ft_cuda_memory_stat(int device, int kind) {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (!at::hasCUDA()) return 0;
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto& s = stats.allocated_bytes[0];  // index 0 = StatType::AGGREGATE in every version
    return kind == 0 ? static_cast<int64_t>(s.current) : static_cast<int64_t>(s.peak);
#else
    (void)device; (void)kind;
    return 0;
#endif
  })
}
FT_API int ft_cuda_reset_peak(int device) {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (at::hasCUDA()) c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
    (void)device;
#endif
    return 0;
  })
}
FT_API int ft_cuda_empty_cache() {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (at::hasCUDA()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
    return 0;
  })
}

// ---------------------------------------------------------------- factories
// kind: 0 zeros, 1 ones, 2 empty, 3 full
FT_API T ft_factory(int kind, const int64_t* shape, int ndim, double value, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, {
    auto o = options(dtype, devtype, devindex);
    auto s = dims(shape, ndim);
    switch (kind) {
      case 0: return wrap(at::zeros(s, o));
      case 1: return wrap(at::ones(s, o));
      case 2: return wrap(at::empty(s, o));
      default: return wrap(at::full(s, value, o));
    }
  })
}
FT_API T ft_arange(double start, double end, double step, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, { return wrap(at::arange(start, end, step, options(dtype, devtype, devindex))); })
}
// kind: 0 randn, 1 rand
FT_API T ft_random(int kind, const int64_t* shape, int ndim, void* gen, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, {
    auto o = options(dtype, devtype, devindex);
    auto s = dims(shape, ndim);
    return wrap(kind == 0 ? at::randn(s, gen_of(gen), o) : at::rand(s, gen_of(gen), o));
  })
}
FT_API T ft_randint(int64_t low, int64_t high, const int64_t* shape, int ndim, void* gen, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, { return wrap(at::randint(low, high, dims(shape, ndim), gen_of(gen), options(dtype, devtype, devindex))); })
}
FT_API T ft_randperm(int64_t n, void* gen, int devtype, int devindex) {
  FT_TRY(nullptr, { return wrap(at::randperm(n, gen_of(gen), options(static_cast<int>(at::kLong), devtype, devindex))); })
}
// Copies nbytes of raw little-endian data into a new tensor.
FT_API T ft_from_data(const void* data, int64_t nbytes, const int64_t* shape, int ndim, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, {
    auto t = at::empty(dims(shape, ndim), at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)));
    int64_t need = t.numel() * static_cast<int64_t>(t.element_size());
    TORCH_CHECK(need == nbytes, "data has ", nbytes, " bytes but shape ", t.sizes(), " of ", t.scalar_type(), " needs ", need);
    if (nbytes > 0) std::memcpy(t.data_ptr(), data, static_cast<size_t>(nbytes));
    if (devtype == 1) t = t.to(device_of(devtype, devindex));
    return wrap(std::move(t));
  })
}
FT_API T ft_scalar(double value, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, { return wrap(at::scalar_tensor(value, options(dtype, devtype, devindex))); })
}

// ---------------------------------------------------------------- info
FT_API int ft_dim(T t) { return static_cast<int>(t->dim()); }
FT_API int ft_shape(T t, int64_t* out, int cap) {
  int n = static_cast<int>(t->dim());
  auto s = t->sizes();
  for (int i = 0; i < n && i < cap; ++i) out[i] = s[i];
  return n;
}
FT_API int64_t ft_numel(T t) { return t->numel(); }
FT_API int ft_dtype(T t) { return static_cast<int>(t->scalar_type()); }
FT_API int64_t ft_element_size(T t) { return static_cast<int64_t>(t->element_size()); }
FT_API int ft_device(T t, int* index) {
  auto d = t->device();
  *index = d.has_index() ? d.index() : 0;
  return d.is_cuda() ? 1 : 0;
}
FT_API int ft_requires_grad(T t) { return t->requires_grad() ? 1 : 0; }
FT_API int ft_set_requires_grad(T t, int on) { FT_TRY(-1, { t->set_requires_grad(on != 0); return 0; }) }
FT_API int ft_is_contiguous(T t) { return t->is_contiguous() ? 1 : 0; }
FT_API int ft_is_leaf(T t) { return t->is_leaf() ? 1 : 0; }
// 1 with *out set, 0 when the tensor has no grad, -1 on error.
FT_API int ft_grad(T t, T* out) {
  FT_TRY(-1, {
    const auto& g = t->grad();
    if (!g.defined()) { *out = nullptr; return 0; }
    *out = wrap(g);
    return 1;
  })
}
FT_API int ft_copy_to(T t, void* dst, int64_t nbytes) {
  FT_TRY(-1, {
    auto c = t->detach().to(at::kCPU).contiguous();
    int64_t have = c.numel() * static_cast<int64_t>(c.element_size());
    TORCH_CHECK(have == nbytes, "buffer of ", nbytes, " bytes for a tensor of ", have, " bytes");
    if (nbytes > 0) std::memcpy(dst, c.data_ptr(), static_cast<size_t>(nbytes));
    return 0;
  })
}
FT_API int ft_item_double(T t, double* out) { FT_TRY(-1, { *out = t->item<double>(); return 0; }) }
FT_API int ft_item_long(T t, int64_t* out) { FT_TRY(-1, { *out = t->item<int64_t>(); return 0; }) }
FT_API int ft_item_bool(T t, int* out) { FT_TRY(-1, { *out = t->item<bool>() ? 1 : 0; return 0; }) }
FT_API int ft_allclose(T a, T b, double rtol, double atol, int* out) {
  FT_TRY(-1, { *out = at::allclose(*a, *b, rtol, atol) ? 1 : 0; return 0; })
}

// ---------------------------------------------------------------- conversions
// dtype < 0: keep; devtype < 0: keep.
FT_API T ft_to(T t, int dtype, int devtype, int devindex, int non_blocking) {
  FT_TRY(nullptr, {
    auto st = dtype < 0 ? t->scalar_type() : static_cast<at::ScalarType>(dtype);
    auto dev = devtype < 0 ? t->device() : device_of(devtype, devindex);
    return wrap(t->to(dev, st, non_blocking != 0, false));
  })
}

// ---------------------------------------------------------------- unary ops
enum Unary {
  U_NEG, U_SQRT, U_RSQRT, U_EXP, U_LOG, U_ABS, U_SQUARE, U_SIN, U_COS, U_TANH, U_SIGMOID, U_RELU, U_SILU,
  U_GELU, U_GELU_TANH, U_LOGICAL_NOT, U_SUM, U_MEAN, U_MAX, U_MIN, U_CLONE, U_DETACH, U_CONTIGUOUS,
  U_PIN_MEMORY, U_T, U_ZEROS_LIKE, U_ONES_LIKE, U_INVERSE
};
FT_API T ft_unary(T a, int op) {
  FT_TRY(nullptr, {
    const at::Tensor& x = *a;
    switch (op) {
      case U_NEG: return wrap(at::neg(x));
      case U_SQRT: return wrap(at::sqrt(x));
      case U_RSQRT: return wrap(at::rsqrt(x));
      case U_EXP: return wrap(at::exp(x));
      case U_LOG: return wrap(at::log(x));
      case U_ABS: return wrap(at::abs(x));
      case U_SQUARE: return wrap(at::square(x));
      case U_SIN: return wrap(at::sin(x));
      case U_COS: return wrap(at::cos(x));
      case U_TANH: return wrap(at::tanh(x));
      case U_SIGMOID: return wrap(at::sigmoid(x));
      case U_RELU: return wrap(at::relu(x));
      case U_SILU: return wrap(at::silu(x));
      case U_GELU: return wrap(at::gelu(x, "none"));
      case U_GELU_TANH: return wrap(at::gelu(x, "tanh"));
      case U_LOGICAL_NOT: return wrap(at::logical_not(x));
      case U_SUM: return wrap(at::sum(x));
      case U_MEAN: return wrap(at::mean(x));
      case U_MAX: return wrap(at::max(x));
      case U_MIN: return wrap(at::min(x));
      case U_CLONE: return wrap(x.clone());
      case U_DETACH: return wrap(x.detach());
      case U_CONTIGUOUS: return wrap(x.contiguous());
      case U_PIN_MEMORY: return wrap(x.pin_memory());
      case U_T: return wrap(x.t());
      case U_ZEROS_LIKE: return wrap(at::zeros_like(x));
      case U_ONES_LIKE: return wrap(at::ones_like(x));
      case U_INVERSE: return wrap(at::linalg_inv(x));
      default: TORCH_CHECK(false, "unknown unary op ", op);
    }
  })
}

// ---------------------------------------------------------------- binary ops
enum Binary { B_ADD, B_SUB, B_MUL, B_DIV, B_MATMUL, B_BMM, B_EQ, B_NE, B_LT, B_LE, B_GT, B_GE, B_SOLVE, B_POW };
FT_API T ft_binary(T a, T b, int op, double alpha) {
  FT_TRY(nullptr, {
    const at::Tensor& x = *a;
    const at::Tensor& y = *b;
    switch (op) {
      case B_ADD: return wrap(alpha == 1.0 ? at::add(x, y) : at::add(x, y, alpha));
      case B_SUB: return wrap(alpha == 1.0 ? at::sub(x, y) : at::sub(x, y, alpha));
      case B_MUL: return wrap(at::mul(x, y));
      case B_DIV: return wrap(at::div(x, y));
      case B_MATMUL: return wrap(at::matmul(x, y));
      case B_BMM: return wrap(at::bmm(x, y));
      case B_EQ: return wrap(at::eq(x, y));
      case B_NE: return wrap(at::ne(x, y));
      case B_LT: return wrap(at::lt(x, y));
      case B_LE: return wrap(at::le(x, y));
      case B_GT: return wrap(at::gt(x, y));
      case B_GE: return wrap(at::ge(x, y));
      case B_SOLVE: return wrap(at::linalg_solve(x, y));
      case B_POW: return wrap(at::pow(x, y));
      default: TORCH_CHECK(false, "unknown binary op ", op);
    }
  })
}

enum Scalar { S_ADD, S_SUB, S_MUL, S_DIV, S_POW, S_EQ, S_NE, S_LT, S_LE, S_GT, S_GE, S_RSUB, S_RDIV };
FT_API T ft_binary_scalar(T a, double s, int op) {
  FT_TRY(nullptr, {
    const at::Tensor& x = *a;
    switch (op) {
      case S_ADD: return wrap(at::add(x, s));
      case S_SUB: return wrap(at::sub(x, s));
      case S_MUL: return wrap(at::mul(x, s));
      case S_DIV: return wrap(at::div(x, s));
      case S_POW: return wrap(at::pow(x, s));
      case S_EQ: return wrap(at::eq(x, s));
      case S_NE: return wrap(at::ne(x, s));
      case S_LT: return wrap(at::lt(x, s));
      case S_LE: return wrap(at::le(x, s));
      case S_GT: return wrap(at::gt(x, s));
      case S_GE: return wrap(at::ge(x, s));
      case S_RSUB: return wrap(at::rsub(x, s));
      case S_RDIV: return wrap(at::mul(at::reciprocal(x), s));
      default: TORCH_CHECK(false, "unknown scalar op ", op);
    }
  })
}

FT_API T ft_clamp(T a, double min, int has_min, double max, int has_max) {
  FT_TRY(nullptr, {
    c10::optional<at::Scalar> lo, hi;
    if (has_min) lo = min;
    if (has_max) hi = max;
    return wrap(at::clamp(*a, lo, hi));
  })
}

// ---------------------------------------------------------------- dim ops
enum DimOp {
  D_TRANSPOSE, D_UNSQUEEZE, D_SQUEEZE, D_FLATTEN, D_NARROW, D_SELECT, D_TRIL, D_TRIU, D_ARGMAX, D_SOFTMAX,
  D_LOG_SOFTMAX, D_SIZE
};
FT_API T ft_dimop(T a, int op, int64_t p0, int64_t p1, int64_t p2) {
  FT_TRY(nullptr, {
    const at::Tensor& x = *a;
    switch (op) {
      case D_TRANSPOSE: return wrap(x.transpose(p0, p1));
      case D_UNSQUEEZE: return wrap(x.unsqueeze(p0));
      case D_SQUEEZE: return wrap(x.squeeze(p0));
      case D_FLATTEN: return wrap(x.flatten(p0, p1));
      case D_NARROW: return wrap(x.narrow(p0, p1, p2));
      case D_SELECT: return wrap(x.select(p0, p1));
      case D_TRIL: return wrap(at::tril(x, p0));
      case D_TRIU: return wrap(at::triu(x, p0));
      case D_ARGMAX: return wrap(at::argmax(x, p0, false));
      case D_SOFTMAX: return wrap(at::softmax(x, p0));
      case D_LOG_SOFTMAX: return wrap(at::log_softmax(x, p0));
      default: TORCH_CHECK(false, "unknown dim op ", op);
    }
  })
}

enum ShapeOp { SH_VIEW, SH_RESHAPE, SH_PERMUTE, SH_EXPAND, SH_REPEAT };
FT_API T ft_shapeop(T a, int op, const int64_t* shape, int n) {
  FT_TRY(nullptr, {
    auto s = dims(shape, n);
    switch (op) {
      case SH_VIEW: return wrap(a->view(s));
      case SH_RESHAPE: return wrap(a->reshape(s));
      case SH_PERMUTE: return wrap(a->permute(s));
      case SH_EXPAND: return wrap(a->expand(s));
      case SH_REPEAT: return wrap(a->repeat(s));
      default: TORCH_CHECK(false, "unknown shape op ", op);
    }
  })
}

// kind 0: chunk(arg chunks), 1: split(arg split size). Returns the number of pieces (<= cap) or -1.
FT_API int ft_split(T a, int kind, int64_t arg, int64_t dim, T* out, int cap) {
  FT_TRY(-1, {
    auto parts = kind == 0 ? a->chunk(arg, dim) : a->split(arg, dim);
    TORCH_CHECK(static_cast<int>(parts.size()) <= cap, "split produced ", parts.size(), " pieces, expected at most ", cap);
    for (size_t i = 0; i < parts.size(); ++i) out[i] = wrap(std::move(parts[i]));
    return static_cast<int>(parts.size());
  })
}
FT_API T ft_cat(T* ts, int n, int64_t dim, int stack) {
  FT_TRY(nullptr, {
    auto v = list(ts, n);
    return wrap(stack ? at::stack(v, dim) : at::cat(v, dim));
  })
}
// op 0: index_select(dim, idx), 1: gather(dim, idx), 2: index_add(dim, idx, src)
FT_API T ft_index(T a, int op, int64_t dim, T idx, T src) {
  FT_TRY(nullptr, {
    switch (op) {
      case 0: return wrap(at::index_select(*a, dim, *idx));
      case 1: return wrap(at::gather(*a, dim, *idx));
      default: return wrap(at::index_add(*a, dim, *idx, *src));
    }
  })
}
FT_API T ft_pad(T a, const int64_t* pad, int n, double value) {
  FT_TRY(nullptr, { return wrap(at::constant_pad_nd(*a, dims(pad, n), value)); })
}

// ---------------------------------------------------------------- reductions
// op 0: sum, 1: mean, 2: norm(p)
FT_API T ft_reduce(T a, int op, const int64_t* d, int n, int keepdim, double p) {
  FT_TRY(nullptr, {
    auto ds = dims(d, n);
    switch (op) {
      case 0: return wrap(at::sum(*a, ds, keepdim != 0));
      case 1: return wrap(at::mean(*a, ds, keepdim != 0));
      default:
        if (n == 0) return wrap(at::norm(*a, p));
        return wrap(at::norm(*a, p, ds, keepdim != 0));
    }
  })
}
FT_API int ft_max_dim(T a, int64_t dim, int keepdim, T* values, T* indices) {
  FT_TRY(-1, {
    auto r = at::max(*a, dim, keepdim != 0);
    *values = wrap(std::get<0>(r));
    *indices = wrap(std::get<1>(r));
    return 0;
  })
}
FT_API int ft_topk(T a, int64_t k, int64_t dim, int largest, T* values, T* indices) {
  FT_TRY(-1, {
    auto r = at::topk(*a, k, dim, largest != 0, true);
    *values = wrap(std::get<0>(r));
    *indices = wrap(std::get<1>(r));
    return 0;
  })
}
FT_API T ft_where(T c, T a, T b) { FT_TRY(nullptr, { return wrap(at::where(*c, *a, *b)); }) }
FT_API T ft_masked_fill(T a, T mask, double value) { FT_TRY(nullptr, { return wrap(a->masked_fill(*mask, value)); }) }

// ---------------------------------------------------------------- in place
enum Inplace { I_ZERO, I_FILL, I_COPY, I_ADD, I_MUL, I_UNIFORM, I_NORMAL };
FT_API int ft_inplace(T a, int op, T other, double s1, double s2, void* gen) {
  FT_TRY(-1, {
    at::Tensor& x = *a;
    switch (op) {
      case I_ZERO: x.zero_(); break;
      case I_FILL: x.fill_(s1); break;
      case I_COPY: x.copy_(*other); break;
      case I_ADD: x.add_(*other, s1); break;
      case I_MUL: x.mul_(s1); break;
      case I_UNIFORM: x.uniform_(s1, s2, gen_of(gen)); break;
      case I_NORMAL: x.normal_(s1, s2, gen_of(gen)); break;
      default: TORCH_CHECK(false, "unknown in-place op ", op);
    }
    return 0;
  })
}

// ---------------------------------------------------------------- autograd
FT_API int ft_backward(T a, T grad, int retain_graph) {
  FT_TRY(-1, {
    at::Tensor g = grad ? *grad : at::Tensor();
    a->backward(g, retain_graph != 0, false);
    return 0;
  })
}

// ---- begin: multi-root backward (VB-LoRA composes its factors once per step and backpropagates them once) ----
// One autograd pass from several roots, each with its incoming gradient (a null gradient skips that root).
FT_API int ft_backward_many(T* roots, T* grads, int n, int retain_graph) {
  FT_TRY(-1, {
    std::vector<at::Tensor> r, g;
    for (int i = 0; i < n; ++i) {
      if (!grads[i]) continue;
      r.push_back(*roots[i]);
      g.push_back(*grads[i]);
    }
    if (!r.empty()) torch::autograd::backward(r, g, retain_graph != 0, false);
    return 0;
  })
}
// ---- end: multi-root backward ----

// ---------------------------------------------------------------- functional
FT_API T ft_linear(T x, T w, T b) {
  FT_TRY(nullptr, { return wrap(b ? at::linear(*x, *w, *b) : at::linear(*x, *w)); })
}
FT_API T ft_embedding(T w, T ids) { FT_TRY(nullptr, { return wrap(at::embedding(*w, *ids)); }) }
// reduction: 0 none, 1 mean, 2 sum (at::Reduction codes)
FT_API T ft_cross_entropy(T logits, T targets, int64_t ignore_index, int reduction) {
  FT_TRY(nullptr, {
    return wrap(at::cross_entropy_loss(*logits, *targets, {}, reduction, ignore_index, 0.0));
  })
}
FT_API T ft_sdpa(T q, T k, T v, T mask, int is_causal, double dropout_p) {
  FT_TRY(nullptr, {
#if FT_AT_LEAST(2, 0)
    c10::optional<at::Tensor> m;
    if (mask) m = *mask;
    return wrap(at::scaled_dot_product_attention(*q, *k, *v, m, dropout_p, is_causal != 0));
#else
    // Same math as 2.x's reference path: softmax(q·kᵀ/√d + mask)·v; a bool mask marks positions to keep.
    const at::Tensor& Q = *q;
    const at::Tensor& K = *k;
    int64_t L = Q.size(-2), S = K.size(-2);
    double scale = 1.0 / std::sqrt(static_cast<double>(Q.size(-1)));
    auto scores = at::matmul(Q, K.transpose(-2, -1)) * scale;
    if (is_causal) {
      auto keep = at::ones({L, S}, Q.options().dtype(at::kBool)).tril();
      scores = scores.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
    }
    if (mask) {
      if (mask->scalar_type() == at::kBool)
        scores = scores.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
      else
        scores = scores + *mask;
    }
    auto attn = at::softmax(scores, -1);
    if (dropout_p > 0) attn = at::dropout(attn, dropout_p, true);
    return wrap(at::matmul(attn, *v));
#endif
  })
}
FT_API T ft_rms_norm(T x, T w, double eps) {
  FT_TRY(nullptr, {
    const at::Tensor& X = *x;
#if FT_AT_LEAST(2, 8)
    // gpu-perf: libtorch's own RMSNorm, one fused CUDA kernel each way that keeps only x and 1/rms for backward
    // (the composed form below keeps several fp32 copies of x). It applies the weight in fp32 before the one rounding.
    if (X.is_cuda() && w->scalar_type() == X.scalar_type()) return wrap(at::rms_norm(X, {X.size(-1)}, *w, eps));
#endif
    auto compute = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto h = X.to(compute);
    h = h * at::rsqrt(h.pow(2).mean(-1, true) + eps);
    return wrap(*w * h.to(X.scalar_type()));
  })
}
FT_API T ft_dropout(T x, double p, int training) {
  FT_TRY(nullptr, { return wrap(at::dropout(*x, p, training != 0)); })
}
// Training-mode dropout whose mask is a function of `seed` alone: a generator of x's device, created and seeded for
// this call, instead of the device's default generator, which every job on the device shares (two jobs of one CPU
// node, or anything else drawing on a GPU, would shift each other's masks). An activation-checkpoint recompute with the
// same seed draws the same mask. CUDA: one fused kernel (mask and output, the mask saved as bytes for backward);
// CPU: a bool Bernoulli mask and a product.
FT_API T ft_dropout_seeded(T x, double p, int64_t seed) {
  FT_TRY(nullptr, {
    TORCH_CHECK(p >= 0 && p < 1, "dropout: p must be in [0, 1), got ", p);
    at::Generator g;
    if (x->is_cuda()) {
      auto def = at::globalContext().defaultGenerator(x->device());
      std::lock_guard<std::mutex> lock(def.mutex());
      g = def.clone();
    } else {
      g = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
    }
    {
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_current_seed(static_cast<uint64_t>(seed));   // on CUDA this also resets the Philox offset
    }
    if (x->is_cuda()) return wrap(std::get<0>(at::_fused_dropout(*x, 1 - p, g)));
    auto keep = at::empty(x->sizes(), x->options().dtype(at::kBool)).bernoulli_(1 - p, g);
    return wrap(x->mul(keep).mul_(1.0 / (1 - p)));
  })
}

// ---------------------------------------------------------------- linear algebra
FT_API int ft_svd(T a, int full, T* u, T* s, T* vh) {
  FT_TRY(-1, {
    auto r = at::linalg_svd(*a, full != 0);
    *u = wrap(std::get<0>(r));
    *s = wrap(std::get<1>(r));
    *vh = wrap(std::get<2>(r));
    return 0;
  })
}
FT_API int ft_qr(T a, int reduced, T* q, T* r) {
  FT_TRY(-1, {
    auto res = at::linalg_qr(*a, reduced ? "reduced" : "complete");
    *q = wrap(std::get<0>(res));
    *r = wrap(std::get<1>(res));
    return 0;
  })
}

// ---------------------------------------------------------------- optimizers
// AdamW over one parameter group. State tensors are owned by the caller; parameters without a grad are skipped.
// `step` is the step number after this update (1 on the first call).
FT_API int ft_adamw_step(T* params, T* exp_avg, T* exp_avg_sq, int n, double lr, double beta1, double beta2,
                         double eps, double weight_decay, int64_t step) {
  FT_TRY(-1, {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p, g, m, v;
    for (int i = 0; i < n; ++i) {
      const auto& grad = params[i]->grad();
      if (!grad.defined()) continue;
      p.push_back(*params[i]);
      g.push_back(grad);
      m.push_back(*exp_avg[i]);
      v.push_back(*exp_avg_sq[i]);
    }
    if (p.empty()) return 0;
#if FT_AT_LEAST(2, 1)
    bool all_cuda = true;
    // The fused kernel dispatches on the first tensor's dtype and device: mixed lists take the foreach path.
    for (const auto& t : p)
      all_cuda = all_cuda && t.is_cuda() && at::isFloatingType(t.scalar_type()) && t.scalar_type() == p[0].scalar_type() &&
                 t.device() == p[0].device();
    if (all_cuda) {
      // The fused kernel reads the (already incremented) step from a float tensor per parameter and never writes
      // it, so one device tensor serves every parameter: one fill per step instead of one per parameter.
      auto step_t = at::full({}, static_cast<double>(step), p[0].options().dtype(at::kFloat));
      std::vector<at::Tensor> steps(p.size(), step_t);
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
      return 0;
    }
#endif
    if (weight_decay != 0) at::_foreach_mul_(p, 1.0 - lr * weight_decay);
    at::_foreach_mul_(m, beta1);
    at::_foreach_add_(m, g, 1.0 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1.0 - beta2);
    double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, std::sqrt(bc2));
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(p, m, denom, -lr / bc1);
    return 0;
  })
}
// SGD with optional momentum (buffers may be null when momentum == 0) and coupled weight decay.
FT_API int ft_sgd_step(T* params, T* bufs, int n, double lr, double momentum, double weight_decay, int first) {
  FT_TRY(-1, {
    at::NoGradGuard no_grad;
    for (int i = 0; i < n; ++i) {
      const auto& grad0 = params[i]->grad();
      if (!grad0.defined()) continue;
      at::Tensor d = weight_decay != 0 ? grad0 + weight_decay * *params[i] : grad0;
      if (momentum != 0) {
        at::Tensor& b = *bufs[i];
        if (first) b.copy_(d); else b.mul_(momentum).add_(d);
        d = b;
      }
      params[i]->add_(d, -lr);
    }
    return 0;
  })
}
FT_API int ft_zero_grad(T* params, int n) {
  FT_TRY(-1, {
    for (int i = 0; i < n; ++i) params[i]->mutable_grad().reset();
    return 0;
  })
}
// Global L2 norm of all grads; scales them by max_norm / (norm + 1e-6) when that is below 1.
FT_API int ft_clip_grad_norm(T* params, int n, double max_norm, double* total) {
  FT_TRY(-1, {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> grads;
    for (int i = 0; i < n; ++i) {
      const auto& g = params[i]->grad();
      if (g.defined()) grads.push_back(g);
    }
    if (grads.empty()) { *total = 0; return 0; }
    std::vector<at::Tensor> norms;
    norms.reserve(grads.size());
    auto dev = grads[0].device();
    for (const auto& g : grads) norms.push_back(at::norm(g.scalar_type() == at::kDouble ? g : g.to(at::kFloat), 2).to(dev));
    auto norm = at::norm(at::stack(norms), 2);
    double tn = norm.item<double>();
    *total = tn;
    double coef = max_norm / (tn + 1e-6);
    if (coef < 1.0) at::_foreach_mul_(grads, coef);
    return 0;
  })
}

// ================================================================ adapter operators (bone-family)
// Bat (block-affine adaptation, PEFT MiSS init_weights="bat") as one linear layer with its own autograd node.
// PEFT materialises W' = W + ΔW in fp32 every step and autograd keeps it (and the fp32 copy of x) for backward.
// Here W' is built in the compute dtype, used for one matmul and freed; backward saves only x, D (and W, which is
// the frozen base and costs nothing) and recomputes W'. The math, for r×r blocks W_{o,a} (o: output block,
// a: input block) of W (out, in):
//   col (PEFT "bat"), D (out/r, r, r):  W'_{o,a} = W_{o,a}(I + D_o) + D_o,  ∂L/∂D_o = Σ_a (W_{o,a} + I)ᵀ G_{o,a}
//   row (ours),       D (in/r, r, r):   W'_{o,a} = (I + D_a)W_{o,a} + D_a,  ∂L/∂D_a = Σ_o G_{o,a} (W_{o,a} + I)ᵀ
// with G = ∂L/∂W' = gyᵀ·x. Row is col applied to Wᵀ with E_a = D_aᵀ, which is how it is computed.
namespace {
// Column grouping on a (rows, cols) matrix w with blocks D (rows/r, r, r) of w's dtype: returns W' (rows, cols).
// Viewed as (rows/r, cols, r), batch o holds the r rows of block row o with each row cut into r-wide pieces, so
// W_{o,a}·D_o for every a is one bmm and no permute copies are made.
at::Tensor bat_col_weight(const at::Tensor& w, const at::Tensor& d) {
  const int64_t rows = w.size(0), cols = w.size(1), r = d.size(-1), blocks = rows / r;
  auto wc = w.contiguous().view({blocks, cols, r});
  auto wp = at::baddbmm(wc, wc, d);  // W + W·D
  return wp.view({blocks, r, cols / r, r}).add_(d.unsqueeze(2)).view({rows, cols});
}

// ∂L/∂D_o = Σ_a W_{o,a}ᵀ G_{o,a} + Σ_a G_{o,a} for the column grouping, in w's dtype.
at::Tensor bat_col_grad(const at::Tensor& w, const at::Tensor& g, int64_t r) {
  const int64_t rows = w.size(0), cols = w.size(1), blocks = rows / r;
  auto wc = w.contiguous().view({blocks, cols, r});
  auto gc = g.contiguous().view({blocks, cols, r});
  auto gsum = gc.view({blocks, r, cols / r, r}).sum(2);
  return at::baddbmm(gsum, wc.transpose(1, 2), gc);
}

void bat_check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, bool row) {
  TORCH_CHECK(w.dim() == 2, "bat_linear: weight must be 2-D (out, in), got ", w.sizes());
  TORCH_CHECK(d.dim() == 3 && d.size(1) == d.size(2), "bat_linear: block must be (n, r, r), got ", d.sizes());
  const int64_t out = w.size(0), in = w.size(1), r = d.size(2);
  TORCH_CHECK(r > 0 && out % r == 0 && in % r == 0, "bat_linear: r=", r, " must divide the weight's shape (", out, ", ", in, ")");
  TORCH_CHECK(d.size(0) == (row ? in : out) / r, "bat_linear: ", row ? "row" : "col", " grouping of a (", out, ", ", in,
              ") weight needs a block of (", (row ? in : out) / r, ", ", r, ", ", r, "), got ", d.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "bat_linear: input's last dimension ", x.size(-1), " does not match in=", in);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "bat_linear: input is ", x.scalar_type(), " but the weight is ", w.scalar_type());
  TORCH_CHECK(!w.requires_grad(), "bat_linear: the base weight must be frozen (requires_grad false)");
}

// W' in w's dtype; for row grouping its transpose (in, out), contiguous, which the matmuls use as it is.
at::Tensor bat_weight_for(const at::Tensor& w, const at::Tensor& d, bool row) {
  auto dc = d.to(w.scalar_type());
  if (!row) return bat_col_weight(w, dc);
  return bat_col_weight(w.t().contiguous(), dc.transpose(1, 2));
}

struct BatLinear : public torch::autograd::Function<BatLinear> {
  // The bias is optional<Tensor>: an undefined Tensor argument trips autograd's device check in 1.13.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias,
                            at::Tensor d, bool row) {
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    bat_check(x, w, d, row);
    at::Tensor y;
    {
      auto wp = bat_weight_for(w, d, row);
      auto weight = row ? wp.t() : wp;
      y = b.defined() ? at::linear(x, weight, b.to(x.scalar_type())) : at::linear(x, weight);
    }  // W' is freed here: backward rebuilds it
    ctx->save_for_backward({x, w, d});
    ctx->saved_data["row"] = row;
    ctx->saved_data["x_grad"] = x.requires_grad();
    ctx->saved_data["b_grad"] = b.defined() && b.requires_grad();
    ctx->saved_data["b_dtype"] = b.defined() ? static_cast<int64_t>(b.scalar_type()) : static_cast<int64_t>(-1);
    ctx->saved_data["d_grad"] = d.requires_grad();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& d = saved[2];
    const bool row = ctx->saved_data["row"].toBool();
    const int64_t out = w.size(0), in = w.size(1), r = d.size(2);
    auto gy = grads[0].to(x.scalar_type());
    auto gy2 = gy.reshape({-1, out});
    auto x2 = x.reshape({-1, in});
    at::Tensor gx, gb, gd;
    if (ctx->saved_data["x_grad"].toBool()) {
      auto wp = bat_weight_for(w, d, row);
      gx = (row ? gy2.mm(wp.t()) : gy2.mm(wp)).view(x.sizes());
    }  // W' freed before G (out × in) is made: one weight-sized temporary at a time
    if (ctx->saved_data["d_grad"].toBool()) {
      if (!row) {
        gd = bat_col_grad(w, gy2.t().mm(x2), r);
      } else {
        gd = bat_col_grad(w.t().contiguous(), x2.t().mm(gy2), r).transpose(1, 2);
      }
      gd = gd.to(d.scalar_type());
    }
    if (ctx->saved_data["b_grad"].toBool())
      gb = gy2.sum(0).to(static_cast<at::ScalarType>(ctx->saved_data["b_dtype"].toInt()));
    return {gx, at::Tensor(), gb, gd, at::Tensor()};
  }
};
}  // namespace

// y = x·(W + ΔW_bat(W, D))ᵀ + b. grouping 0: col (D (out/r, r, r), PEFT's bat), 1: row (D (in/r, r, r)).
// x and W share the compute dtype; D may be wider (fp32 master copy): it is cast for the product and its gradient
// comes back in its own dtype. W must be frozen. b may be null.
FT_API T ft_bat_linear(T x, T w, T b, T d, int grouping) {
  FT_TRY(nullptr, {
    TORCH_CHECK(grouping == 0 || grouping == 1, "bat_linear: grouping must be 0 (col) or 1 (row), got ", grouping);
    c10::optional<at::Tensor> bias;
    if (b) bias = *b;
    return wrap(BatLinear::apply(*x, *w, bias, *d, grouping == 1));
  })
}
// ================================================================ end adapter operators (bone-family)

// ---- begin: fused LoRA linear ----
// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd node over a frozen W. Against the composed form (base linear, LoRA
// product, add) it makes no separate (tokens × out) sum and, in backward, no (tokens × in) adapter gradient of x nor
// autograd's sum of it with the base one. The rank-r product comes first and the frozen GEMM accumulates into it
// (beta = 1): that folds the adapter's share into the big GEMM's epilogue, where adding a K = r GEMM into the base
// output read and wrote the whole output once more (2–3% of a 1B model's step on an H200, measured both ways).
// Backward likewise: gx = (s·gy B) A, then += gy W. The math runs in x's dtype; A and B (fp32 masters with
// adapterDtype mixed) are cast for the products, s folded into B's cast, and their gradients come back in their own
// dtype, as through torch.autocast's casts. Saves x (the base linear would keep it anyway), W (frozen), the casts of
// A and s·B (r × in, out × r: casting again in backward was two more tiny kernels per module) and x Aᵀ (tokens × r).
namespace {
// s·m in dtype `cd`, one kernel (the cast and the scale together); m itself when nothing changes.
at::Tensor scaled_as(const at::Tensor& m, double s, at::ScalarType cd) {
  if (s == 1.0) return m.to(cd);
  auto out = at::empty(m.sizes(), m.options().dtype(cd));
  at::mul_out(out, m, c10::scalar_to_tensor(s));
  return out;
}

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias,
                            at::Tensor a, at::Tensor b, double s) {
    const auto cd = x.scalar_type();
    auto x2 = x.reshape({-1, x.size(-1)});
    auto ac = a.to(cd);
    auto bs = scaled_as(b, s, cd);                                          // s·B
    auto t = at::mm(x2, ac.t());                                            // (N, r)
    auto y2 = at::mm(t, bs.t());                                            // s·(x Aᵀ) Bᵀ
    y2.addmm_(x2, w.t());                                                   // + x Wᵀ in the big GEMM
    if (bias.has_value()) y2.add_(bias->to(cd));
    ctx->save_for_backward({x, w, ac, bs, t});
    ctx->saved_data["a_dtype"] = static_cast<int64_t>(a.scalar_type());
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(b.scalar_type());
    ctx->saved_data["s"] = s;
    // needs_input_grad counts only the tensors given (the bias may be absent): record what needs a gradient instead.
    ctx->saved_data["grads"] = static_cast<int64_t>((x.requires_grad() ? 1 : 0) | (a.requires_grad() ? 2 : 0) | (b.requires_grad() ? 4 : 0));
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return y2.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& a = saved[2];   // A in x's dtype
    const auto& bs = saved[3];  // s·B in x's dtype
    const auto& t = saved[4];
    const double s = ctx->saved_data["s"].toDouble();
    const auto cd = x.scalar_type();
    const auto a_dtype = static_cast<at::ScalarType>(ctx->saved_data["a_dtype"].toInt());
    const auto b_dtype = static_cast<at::ScalarType>(ctx->saved_data["b_dtype"].toInt());
    auto g2 = grads[0].to(cd).reshape({-1, w.size(0)});
    auto gt = at::mm(g2, bs);                                                // s·gy B, (N, r)
    const int64_t need = ctx->saved_data["grads"].toInt();
    at::Tensor gx, ga, gb;
    if (need & 1) {
      gx = at::mm(gt, a);                                                    // s·(gy B) A, then += gy W
      gx.addmm_(g2, w);
      gx = gx.view(x.sizes());
    }
    if (need & 2) ga = at::mm(gt.t(), x.reshape({-1, x.size(-1)})).to(a_dtype);
    if (need & 4) gb = scaled_as(at::mm(g2.t(), t), s, b_dtype);            // s·gyᵀ (x Aᵀ)
    return {gx, at::Tensor(), at::Tensor(), ga, gb, at::Tensor()};
  }
};
}  // namespace

// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ; x (…, in) and W (out, in) share a dtype, A (r, in) and B (out, r) may be wider; W and b
// must be frozen; b may be null.
FT_API T ft_lora_linear(T x, T w, T b, T a, T bm, double s) {
  FT_TRY(nullptr, {
    TORCH_CHECK(w->scalar_type() == x->scalar_type(), "lora_linear: x and W must share a dtype, got ", x->scalar_type(), " and ", w->scalar_type());
    TORCH_CHECK(!w->requires_grad() && !(b && b->requires_grad()), "lora_linear: the base weight and bias must be frozen");
    TORCH_CHECK(w->dim() == 2 && a->dim() == 2 && bm->dim() == 2 && w->size(1) == x->size(-1) && a->size(1) == w->size(1) &&
                    bm->size(1) == a->size(0) && bm->size(0) == w->size(0),
                "lora_linear: shapes do not chain: x ", x->sizes(), ", W ", w->sizes(), ", A ", a->sizes(), ", B ", bm->sizes());
    c10::optional<at::Tensor> bias;
    if (b) bias = *b;
    return wrap(LoraLinear::apply(*x, *w, bias, *a, *bm, s));
  })
}

// ---- fp32 LoRA math over a bf16 base on bf16 tensor cores (adapterDtype fp32 on CUDA) ----
// PEFT's fp32 LoRA casts x (tokens × in) and the upstream gradient (tokens × out) to fp32 and runs FFMA GEMMs on
// them: the copies and the fp32 GEMMs were ~40% of such a step. Here x and the gradient stay bf16, which they
// represent exactly, and every fp32 operand (A, B, x Aᵀ, its gradient) is split into three bf16 terms that sum to it
// exactly (split3, fp32's 24 significant bits as 3 × 8); the GEMMs run on bf16 tensor cores with fp32 outputs
// (at::mm's out_dtype, torch ≥ 2.8) and the three partial products are summed in fp32. So x Aᵀ and the gradients of
// A and B are fp32 GEMMs' values up to fp32 accumulation order. The two products that end in bf16 tensors (the
// output and the input gradient) use the three leading pair terms (hi·hi + hi·mid + mid·hi, ~16 bits) and are rounded
// once, into the base GEMM's output.
#if defined(FT_CUDA_KERNELS) && FT_AT_LEAST(2, 8)
#define FT_SPLIT_GEMM 1
namespace {
// m (rows, cols) fp32, any strides, times scale → bf16 (3, rows, cols) (planar) or (rows, 3·cols) (interleaved).
at::Tensor split3(const at::Tensor& m, double scale, bool planar) {
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kFloat, "split3: an fp32 matrix expected");
  const int64_t rows = m.size(0), cols = m.size(1);
  auto out = planar ? at::empty({3, rows, cols}, m.options().dtype(at::kBFloat16))
                    : at::empty({rows, 3 * cols}, m.options().dtype(at::kBFloat16));
  fused_check(ft_fused_split3(m.data_ptr<float>(), rows, cols, m.stride(0), 0, m.stride(1), 1, static_cast<float>(scale),
                              out.data_ptr(), planar ? 1 : 0, at::cuda::getCurrentCUDAStream().stream()),
              "split3");
  return out;
}
// p (rows, 3·r) fp32 of three partial products side by side → the split of scale·(p₀ + p₁ + p₂), (rows, 3·r).
at::Tensor sum3_split3(const at::Tensor& p, int64_t r, double scale) {
  TORCH_CHECK(p.dim() == 2 && p.size(1) == 3 * r && p.stride(1) == 1 && p.scalar_type() == at::kFloat,
              "sum3_split3: (rows, 3r) fp32 expected");
  const int64_t rows = p.size(0);
  auto out = at::empty({rows, 3 * r}, p.options().dtype(at::kBFloat16));
  fused_check(ft_fused_split3(p.data_ptr<float>(), rows, r, p.stride(0), r, 1, 3, static_cast<float>(scale),
                              out.data_ptr(), 0, at::cuda::getCurrentCUDAStream().stream()),
              "split3");
  return out;
}
// (rows, 3·r) interleaved split [hi | mid | lo] → [hi | hi | mid] (the left factor of the pair terms).
at::Tensor left_pairs(const at::Tensor& s3, int64_t r) {
  auto hi = s3.narrow(1, 0, r);
  return at::cat({hi, hi, s3.narrow(1, r, r)}, 1);
}
// (rows, 3·r) interleaved split → [hi | mid | hi] (the right factor).
at::Tensor right_pairs(const at::Tensor& s3, int64_t r) {
  auto hi = s3.narrow(1, 0, r);
  return at::cat({hi, s3.narrow(1, r, r), hi}, 1);
}

// a_exact: A's values are bf16 numbers (Bone's one-hot chunk sum), so A is one term instead of three.
struct LoraLinearExact : public torch::autograd::Function<LoraLinearExact> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias,
                            at::Tensor a, at::Tensor b, double s, bool a_exact) {
    const int64_t r = a.size(0), in = a.size(1), out = w.size(0);
    const int64_t ka = a_exact ? 1 : 3;
    auto x2 = x.reshape({-1, in});
    auto a3 = a_exact ? a.to(at::kBFloat16).contiguous().unsqueeze(0)       // (1, r, in): A itself
                      : split3(a, 1.0, true);                                // (3, r, in): A = Σ terms
    auto p = at::mm(x2, a3.view({ka * r, in}).t(), at::kFloat);             // (N, ka·r): x·A_kᵀ
    auto t3 = a_exact ? split3(p, s, false) : sum3_split3(p, r, s);         // split of s·x Aᵀ, (N, 3r)
    auto b3 = split3(b, 1.0, false);                                         // (out, 3r): [B_hi | B_mid | B_lo]
    auto y2 = at::mm(left_pairs(t3, r), right_pairs(b3, r).t());             // s·(x Aᵀ) Bᵀ, bf16
    y2.addmm_(x2, w.t());                                                    // + x Wᵀ in the big GEMM
    if (bias.has_value()) y2.add_(bias->to(y2.scalar_type()));
    ctx->save_for_backward({x, w, a3, b3, t3});
    ctx->saved_data["s"] = s;
    ctx->saved_data["grads"] = static_cast<int64_t>((x.requires_grad() ? 1 : 0) | (a.requires_grad() ? 2 : 0) | (b.requires_grad() ? 4 : 0));
    auto shape = x.sizes().vec();
    shape.back() = out;
    return y2.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& a3 = saved[2];
    const auto& b3 = saved[3];
    const auto& t3 = saved[4];
    const double s = ctx->saved_data["s"].toDouble();
    const int64_t need = ctx->saved_data["grads"].toInt();
    const int64_t r = a3.size(1), in = a3.size(2), out = w.size(0);
    auto g2 = grads[0].to(x.scalar_type()).reshape({-1, out});
    auto x2 = x.reshape({-1, in});
    auto gt3 = sum3_split3(at::mm(g2, b3, at::kFloat), r, s);               // split of s·gy B, (N, 3r)
    at::Tensor gx, ga, gb;
    if (need & 1) {
      // [gt_hi | gt_hi | gt_mid] · [A_hi; A_mid; A_hi] (one-term A: [gt_hi | gt_mid] · [A; A]), then + gy W in the big GEMM
      const bool a_exact = a3.size(0) == 1;
      auto ar = a_exact ? at::cat({a3.select(0, 0), a3.select(0, 0)}, 0)
                        : at::cat({a3.select(0, 0), a3.select(0, 1), a3.select(0, 0)}, 0);
      gx = at::mm(a_exact ? gt3.narrow(1, 0, 2 * r) : left_pairs(gt3, r), ar);
      gx.addmm_(g2, w);
      gx = gx.view(x.sizes());
    }
    if (need & 2) ga = at::mm(gt3.t(), x2, at::kFloat).view({3, r, in}).sum(0);          // gtᵀ x
    if (need & 4) gb = at::mm(g2.t(), t3, at::kFloat).view({out, 3, r}).sum(1);          // gyᵀ (s·x Aᵀ)
    return {gx, at::Tensor(), at::Tensor(), ga, gb, at::Tensor(), at::Tensor()};
  }
};

// Σ_row a ⊙ b per column of bf16 (rows, cols), fp32 and deterministic (ft_fused_col_dot).
at::Tensor col_dot(const at::Tensor& a, const at::Tensor& b) {
  const int64_t rows = a.size(0), cols = a.size(1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, (rows + 127) / 128));
  auto partial = at::empty({chunks, cols}, a.options().dtype(at::kFloat));
  auto out = at::empty({cols}, a.options().dtype(at::kFloat));
  fused_check(ft_fused_col_dot(a.data_ptr(), b.data_ptr(), rows, cols, chunks, partial.data_ptr<float>(),
                               out.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
              "col_dot");
  return out;
}

// DoRA with fp32 adapter math over a bf16 base: y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b, f (out) fp32 = m / ‖W + s·B·A‖
// (the norm detached: f carries m's gradient). The frozen product v = x Wᵀ (bf16, as PEFT's base output) and the
// adapter's d = s·(x Aᵀ) Bᵀ (the exact split products above, bf16) are summed and scaled by f in fp32 and rounded once
// (dora_combine): PEFT's bf16(f·v + f·s·(x Aᵀ) Bᵀ) but for d's own rounding, which is tiny beside v. A change of f below
// bf16's resolution (early in training, m moves by the learning rate) thus still moves y, as in PEFT; rounding v + d
// first and scaling after would lose it. Backward: the frozen GEMM takes bf16(gy ⊙ f), what PEFT's bf16 base output
// receives; the adapter path keeps gy exact and moves f onto B, (gy ⊙ f)·B = gy·(f ⊙ B) and ∂L/∂B = f ⊙ s·gyᵀ(x Aᵀ), so
// A's and B's gradients are fp32 values as in PEFT; ∂L/∂f = Σ_tokens gy ⊙ (v + d), taken as Σ gy ⊙ y₀ / f from the
// saved bf16 output y₀ = f ⊙ (v + d) (one deterministic kernel pass).
struct DoraLinearExact : public torch::autograd::Function<DoraLinearExact> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias,
                            at::Tensor a, at::Tensor b, at::Tensor f, double s) {
    const int64_t r = a.size(0), in = a.size(1), out = w.size(0);
    auto x2 = x.reshape({-1, in});
    auto a3 = split3(a, 1.0, true);                                          // (3, r, in)
    auto p = at::mm(x2, a3.view({3 * r, in}).t(), at::kFloat);              // (N, 3r)
    auto t3 = sum3_split3(p, r, s);                                          // split of s·x Aᵀ
    auto b3 = split3(b, 1.0, false);                                         // (out, 3r)
    auto d = at::mm(left_pairs(t3, r), right_pairs(b3, r).t());              // s·(x Aᵀ) Bᵀ, bf16
    auto v = at::mm(x2, w.t());                                              // x Wᵀ, bf16
    auto fc = f.contiguous();
    auto y0 = at::empty_like(v);
    fused_check(ft_fused_dora_combine(v.data_ptr(), d.data_ptr(), fc.data_ptr<float>(), y0.data_ptr(), v.size(0), out,
                                      at::cuda::getCurrentCUDAStream().stream()),
                "dora_combine");
    // A bias (not in Llama's linears) is added after the one rounding of the DoRA product.
    auto y = bias.has_value() ? y0 + bias->to(y0.scalar_type()) : y0;
    ctx->save_for_backward({x, w, a3, b, t3, y0, fc});
    ctx->saved_data["s"] = s;
    ctx->saved_data["grads"] = static_cast<int64_t>((x.requires_grad() ? 1 : 0) | (a.requires_grad() ? 2 : 0) |
                                                    (b.requires_grad() ? 4 : 0) | (f.requires_grad() ? 8 : 0));
    auto shape = x.sizes().vec();
    shape.back() = out;
    return y.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& a3 = saved[2];
    const auto& b = saved[3];
    const auto& t3 = saved[4];
    const auto& y0 = saved[5];
    const auto& f = saved[6];
    const double s = ctx->saved_data["s"].toDouble();
    const int64_t need = ctx->saved_data["grads"].toInt();
    const int64_t r = a3.size(1), in = a3.size(2), out = w.size(0);
    auto g2 = grads[0].to(x.scalar_type()).contiguous().view({-1, out});
    auto x2 = x.reshape({-1, in});
    auto fb = b * f.unsqueeze(1);                                            // f ⊙ B, (out, r) fp32
    auto gt3 = sum3_split3(at::mm(g2, split3(fb, 1.0, false), at::kFloat), r, s);  // split of s·(gy ⊙ f) B
    at::Tensor gx, ga, gb, gf;
    if (need & 1) {
      auto gzf = at::empty_like(g2);
      at::mul_out(gzf, g2, f);                                               // bf16(gy ⊙ f) for the frozen GEMM
      auto ar = at::cat({a3.select(0, 0), a3.select(0, 1), a3.select(0, 0)}, 0);
      gx = at::mm(left_pairs(gt3, r), ar);
      gx.addmm_(gzf, w);
      gx = gx.view(x.sizes());
    }
    if (need & 2) ga = at::mm(gt3.t(), x2, at::kFloat).view({3, r, in}).sum(0);
    if (need & 4) gb = at::mm(g2.t(), t3, at::kFloat).view({out, 3, r}).sum(1).mul_(f.unsqueeze(1));
    if (need & 8) gf = col_dot(g2, y0).div_(f);                             // Σ gy ⊙ (v + d)
    return {gx, at::Tensor(), at::Tensor(), ga, gb, gf, at::Tensor()};
  }
};
}  // namespace
#endif

// Whether ft_lora_linear_exact runs on tensors of `device_type` (1 = CUDA): CUDA, the fused kernels and torch ≥ 2.8.
FT_API int ft_lora_linear_exact_available(int device_type) {
#ifdef FT_SPLIT_GEMM
  return device_type == 1 ? 1 : 0;
#else
  (void)device_type;
  return 0;
#endif
}

// DoRA's y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b with x and W bf16 on CUDA, A, B and f (out) fp32 (see DoraLinearExact);
// available where ft_lora_linear_exact is.
FT_API T ft_dora_linear_exact(T x, T w, T b, T a, T bm, T f, double s) {
  FT_TRY(nullptr, {
#ifdef FT_SPLIT_GEMM
    TORCH_CHECK(x->is_cuda() && x->scalar_type() == at::kBFloat16 && w->scalar_type() == at::kBFloat16,
                "dora_linear_exact: x and W must be bf16 CUDA tensors, got ", x->scalar_type(), " on ", x->device(), " and ", w->scalar_type());
    TORCH_CHECK(a->scalar_type() == at::kFloat && bm->scalar_type() == at::kFloat && f->scalar_type() == at::kFloat,
                "dora_linear_exact: A, B and f must be fp32, got ", a->scalar_type(), ", ", bm->scalar_type(), " and ", f->scalar_type());
    TORCH_CHECK(!w->requires_grad() && !(b && b->requires_grad()), "dora_linear_exact: the base weight and bias must be frozen");
    TORCH_CHECK(w->dim() == 2 && a->dim() == 2 && bm->dim() == 2 && f->dim() == 1 && w->size(1) == x->size(-1) &&
                    a->size(1) == w->size(1) && bm->size(1) == a->size(0) && bm->size(0) == w->size(0) && f->size(0) == w->size(0),
                "dora_linear_exact: shapes do not chain: x ", x->sizes(), ", W ", w->sizes(), ", A ", a->sizes(), ", B ", bm->sizes(),
                ", f ", f->sizes());
    c10::cuda::CUDAGuard guard(x->device());
    c10::optional<at::Tensor> bias;
    if (b) bias = *b;
    return wrap(DoraLinearExact::apply(*x, *w, bias, *a, *bm, *f, s));
#else
    (void)x; (void)w; (void)b; (void)a; (void)bm; (void)f; (void)s;
    TORCH_CHECK(false, "dora_linear_exact needs CUDA, the fused kernels and libtorch >= 2.8 (this build has not)");
    return static_cast<T>(nullptr);
#endif
  })
}

// y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with x and W bf16 on CUDA, A (r, in) and B (out, r) fp32, computed as described above;
// a_exact != 0 promises that A's values are bf16 numbers (one term for A instead of three).
FT_API T ft_lora_linear_exact(T x, T w, T b, T a, T bm, double s, int a_exact) {
  FT_TRY(nullptr, {
#ifdef FT_SPLIT_GEMM
    TORCH_CHECK(x->is_cuda() && x->scalar_type() == at::kBFloat16 && w->scalar_type() == at::kBFloat16,
                "lora_linear_exact: x and W must be bf16 CUDA tensors, got ", x->scalar_type(), " on ", x->device(), " and ", w->scalar_type());
    TORCH_CHECK(a->scalar_type() == at::kFloat && bm->scalar_type() == at::kFloat, "lora_linear_exact: A and B must be fp32, got ",
                a->scalar_type(), " and ", bm->scalar_type());
    TORCH_CHECK(!w->requires_grad() && !(b && b->requires_grad()), "lora_linear_exact: the base weight and bias must be frozen");
    TORCH_CHECK(w->dim() == 2 && a->dim() == 2 && bm->dim() == 2 && w->size(1) == x->size(-1) && a->size(1) == w->size(1) &&
                    bm->size(1) == a->size(0) && bm->size(0) == w->size(0),
                "lora_linear_exact: shapes do not chain: x ", x->sizes(), ", W ", w->sizes(), ", A ", a->sizes(), ", B ", bm->sizes());
    c10::cuda::CUDAGuard guard(x->device());
    c10::optional<at::Tensor> bias;
    if (b) bias = *b;
    return wrap(LoraLinearExact::apply(*x, *w, bias, *a, *bm, s, a_exact != 0));
#else
    (void)x; (void)w; (void)b; (void)a; (void)bm; (void)s; (void)a_exact;
    TORCH_CHECK(false, "lora_linear_exact needs CUDA, the fused kernels and libtorch >= 2.8 (this build has not)");
    return static_cast<T>(nullptr);
#endif
  })
}
// ---- end: fused LoRA linear ----

// ================================================================ gpu-perf: training-path performance
// (device pinning, per-device seeding, pinned async uploads, fused linear + cross-entropy, activation checkpointing)

FT_API int ft_cuda_set_device(int index) {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (at::hasCUDA()) c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
#else
    (void)index;
#endif
    return 0;
  })
}
FT_API int ft_cuda_current_device() {
  FT_TRY(-1, {
#ifdef FT_WITH_CUDA
    if (at::hasCUDA()) return static_cast<int>(c10::cuda::current_device());
#endif
    return 0;
  })
}

// Seeds one device's default generator only (the CPU one for devtype 0): jobs on other GPUs of the node keep theirs.
FT_API int ft_manual_seed_device(int64_t seed, int devtype, int devindex) {
  FT_TRY(-1, {
    at::Generator g = devtype == 1
        ? at::globalContext().defaultGenerator(device_of(devtype, devindex))
        : at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_current_seed(static_cast<uint64_t>(seed));
    return 0;
  })
}

// A second handle on the same tensor (shares storage and autograd identity).
FT_API T ft_alias(T t) { FT_TRY(nullptr, { return wrap(*t); }) }

// Replaces t's data in place (dtype and device may change), keeping the tensor object and its autograd identity:
// `param.data = param.data.to(bf16)`.
FT_API int ft_set_data(T t, T data) { FT_TRY(-1, { t->set_data(*data); return 0; }) }

// sum over dims accumulating and returning in `dtype` (a bf16 input summed in fp32 without an fp32 copy of it).
FT_API T ft_sum_dtype(T a, const int64_t* d, int n, int keepdim, int dtype) {
  FT_TRY(nullptr, { return wrap(at::sum(*a, dims(d, n), keepdim != 0, static_cast<at::ScalarType>(dtype))); })
}

// Host data straight into a page-locked buffer, then an asynchronous copy to the GPU: the host does not wait for the
// GPU to drain its queue, as a copy from pageable memory does. The caching host allocator keeps the buffer until the
// copy has run, so it may be freed at once. On the CPU this is ft_from_data.
FT_API T ft_from_data_async(const void* data, int64_t nbytes, const int64_t* shape, int ndim, int dtype, int devtype, int devindex) {
  FT_TRY(nullptr, {
    auto o = at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype));
    if (devtype == 1) o = o.pinned_memory(true);
    auto t = at::empty(dims(shape, ndim), o);
    int64_t need = t.numel() * static_cast<int64_t>(t.element_size());
    TORCH_CHECK(need == nbytes, "data has ", nbytes, " bytes but shape ", t.sizes(), " of ", t.scalar_type(), " needs ", need);
    if (nbytes > 0) std::memcpy(t.data_ptr(), data, static_cast<size_t>(nbytes));
    if (devtype == 1) t = t.to(device_of(devtype, devindex), /*non_blocking=*/true);
    return wrap(std::move(t));
  })
}

// sdpa with grouped-query attention: q (B, H, T, D), k and v (B, Hkv, T, D), H a multiple of Hkv; query head h reads
// kv head h / (H / Hkv) (HF repeat_kv). libtorch >= 2.5 does this inside the fused kernels (enable_gqa); older
// versions repeat k and v first.
FT_API T ft_sdpa_gqa(T q, T k, T v, T mask, int is_causal, double dropout_p) {
  FT_TRY(nullptr, {
    c10::optional<at::Tensor> m;
    if (mask) m = *mask;
    int64_t h = q->size(-3), hkv = k->size(-3);
    TORCH_CHECK(hkv > 0 && h % hkv == 0, "query heads (", h, ") must be a multiple of key/value heads (", hkv, ")");
#if FT_AT_LEAST(2, 5)
    return wrap(at::scaled_dot_product_attention(*q, *k, *v, m, dropout_p, is_causal != 0, c10::nullopt, h != hkv));
#else
    auto repeat = [&](const at::Tensor& x) {
      if (h == hkv) return x;
      auto s = x.sizes().vec();  // (..., Hkv, T, D)
      std::vector<int64_t> e(s.begin(), s.end());
      e.insert(e.end() - 2, h / hkv);
      auto expanded = x.unsqueeze(-3).expand(e);
      s[s.size() - 3] = h;
      return expanded.reshape(s);
    };
    auto kk = repeat(*k), vv = repeat(*v);
    return ft_sdpa(q, &kk, &vv, mask, is_causal, dropout_p);
#endif
  })
}

namespace {
// An undefined tensor may be stored as None in an IValue.
at::Tensor saved_tensor(torch::autograd::AutogradContext* ctx, const char* key) {
  auto it = ctx->saved_data.find(key);
  return it != ctx->saved_data.end() && it->second.isTensor() ? it->second.toTensor() : at::Tensor();
}

// Cross-entropy of (hidden · weightᵀ) against targets, summed over rows whose target is not ignore_index, computed
// `chunk` rows at a time: the (rows × vocab) fp32 logits of the whole batch never exist, and neither does anything
// saved for backward but the gradient with respect to hidden (and weight, if it is trained), which the forward
// computes chunk by chunk (softmax − one-hot, the fused-linear-cross-entropy scheme). Backward only scales it.
struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t ignore_index, int64_t chunk) {
    bool need_h = hidden.requires_grad(), need_w = weight.requires_grad();
    at::Tensor gh = need_h ? at::empty_like(hidden) : at::Tensor();
    at::Tensor gw = need_w ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
    auto total = chunked(hidden, weight, targets, ignore_index, chunk, &gh, &gw);
    ctx->saved_data["gh"] = gh;
    ctx->saved_data["gw"] = gw;
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return total;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto g = grads[0];
    auto gh = saved_tensor(ctx, "gh");
    auto gw = saved_tensor(ctx, "gw");
    at::Tensor dh, dw;
    if (gh.defined()) dh = gh * g.to(gh.scalar_type());
    if (gw.defined()) dw = (gw * g).to(static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt()));
    return {dh, dw, at::Tensor(), at::Tensor(), at::Tensor()};
  }

  // The summed loss (fp32 scalar; fp64 for fp64 inputs); when gh / gw are defined, fills them with d(sum)/d(hidden)
  // and accumulates d(sum)/d(weight). Per chunk the (rows × vocab) work is: the logits in the input dtype, one fp32
  // log-softmax (as cross_entropy computes it), and for the gradient its exp in place, minus one at the targets, cast
  // to the input dtype; rows of ignored targets are zeroed on the (rows × hidden) side, not the (rows × vocab) one.
  static at::Tensor chunked(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                            int64_t ignore_index, int64_t chunk, at::Tensor* gh, at::Tensor* gw) {
    at::NoGradGuard no_grad;
    int64_t n = hidden.size(0);
    auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto total = at::zeros({}, hidden.options().dtype(acc));
    bool grad = (gh && gh->defined()) || (gw && gw->defined());
#ifdef FT_CUDA_KERNELS
    if (fused_kernel_for(hidden) && weight.scalar_type() == hidden.scalar_type() && n > 0) {
      // One kernel per chunk turns the logits into the row losses and, in place, into softmax − one-hot (zero rows
      // for ignored targets, so no row mask is applied after it).
      c10::cuda::CUDAGuard guard(hidden.device());
      auto stream = at::cuda::getCurrentCUDAStream().stream();
      auto all_targets = targets.to(at::kLong).contiguous();
      auto rows = at::empty({n}, hidden.options().dtype(at::kFloat));
      for (int64_t s = 0; s < n; s += chunk) {
        int64_t len = std::min(chunk, n - s);
        auto h = hidden.narrow(0, s, len);
        auto logits = at::matmul(h, weight.t()).contiguous();  // (len, V)
        fused_check(ft_fused_cross_entropy(logits.data_ptr(), all_targets.data_ptr<int64_t>() + s, len,
                                           logits.size(1), ignore_index, rows.data_ptr<float>() + s,
                                           grad ? logits.data_ptr() : nullptr, fused_dtype(logits.scalar_type()),
                                           stream),
                    "cross_entropy");
        if (!grad) continue;
        if (gh && gh->defined()) {
          auto dst = gh->narrow(0, s, len);
          if (dst.is_contiguous()) at::mm_out(dst, logits, weight);
          else dst.copy_(at::mm(logits, weight));
        }
        if (gw && gw->defined()) gw->add_(at::matmul(logits.t(), h).to(at::kFloat));
      }
      total.add_(rows.sum());
      return total;
    }
#endif
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t len = std::min(chunk, n - s);
      auto h = hidden.narrow(0, s, len);
      auto t = targets.narrow(0, s, len);
      auto logp = at::log_softmax(at::matmul(h, weight.t()).to(acc), -1);  // (len, V)
      auto valid = t.ne(ignore_index);
      auto idx = at::where(valid, t, at::zeros({}, t.options())).unsqueeze(1);
      auto mask = valid.to(acc);
      total.sub_((logp.gather(1, idx).squeeze(1) * mask).sum());
      if (!grad) continue;
      auto p = logp.exp_();  // softmax, in place
      p.scatter_add_(1, idx, at::full({len, 1}, -1.0, p.options()));
      auto pc = p.to(hidden.scalar_type());
      auto rows = mask.unsqueeze(1).to(hidden.scalar_type());
      if (gh && gh->defined()) gh->narrow(0, s, len).copy_(at::matmul(pc, weight).mul_(rows));
      if (gw && gw->defined()) gw->add_(at::matmul(pc.t(), h * rows).to(at::kFloat));
    }
    return total;
  }
};

// Activation checkpointing: forward runs a C# function (a decoder layer) under no-grad and keeps only its inputs;
// backward runs it again with grad enabled, with the RNG state of the first run (same dropout masks), and
// backpropagates through the recomputed graph (gradients accumulate into the adapter tensors, as in PyTorch's
// reentrant checkpoint). The C# side is reached through a function pointer; it may be called on autograd's device
// threads. `anchor` is a tensor that requires grad, so that the output takes part in backward even when no input
// does (the first layer's input, the frozen embeddings' output).
using CheckpointCallback = int (*)(int64_t fn, T* inputs, int n, T* outputs, int cap);
std::atomic<CheckpointCallback> g_checkpoint_cb{nullptr};
constexpr int kMaxCheckpointOutputs = 16;

std::vector<at::Tensor> run_checkpoint_fn(int64_t fn, const std::vector<at::Tensor>& inputs) {
  auto cb = g_checkpoint_cb.load();
  TORCH_CHECK(cb != nullptr, "no activation-checkpoint callback is registered");
  std::vector<T> in;
  in.reserve(inputs.size());
  for (const auto& x : inputs) in.push_back(new at::Tensor(x));  // the callee owns these handles
  T out[kMaxCheckpointOutputs] = {};
  int k = cb(fn, in.data(), static_cast<int>(in.size()), out, kMaxCheckpointOutputs);
  if (k < 0) throw std::runtime_error(g_error);
  std::vector<at::Tensor> result;
  for (int i = 0; i < k; ++i) {
    result.push_back(*out[i]);
    delete out[i];
  }
  return result;
}

struct RngState {
  at::Tensor cpu, cuda;
  at::Device device = at::Device(at::kCPU);
};

RngState save_rng(const at::Device& device) {
  RngState s;
  s.device = device;
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    s.cpu = cpu.get_state();
  }
  if (device.is_cuda()) {
    auto g = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(g.mutex());
    s.cuda = g.get_state();
  }
  return s;
}

void restore_rng(const RngState& s) {
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(s.cpu);
  }
  if (s.cuda.defined()) {
    auto g = at::globalContext().defaultGenerator(s.device);
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(s.cuda);
  }
}

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, int64_t fn, at::TensorList inputs,
                                                const at::Tensor& anchor) {
    (void)anchor;
    std::vector<at::Tensor> in(inputs.begin(), inputs.end());
    auto device = in.empty() ? at::Device(at::kCPU) : in[0].device();
    auto rng = save_rng(device);
    ctx->saved_data["fn"] = fn;
    ctx->saved_data["rng_cpu"] = rng.cpu;
    ctx->saved_data["rng_cuda"] = rng.cuda;
    ctx->saved_data["rng_device"] = static_cast<int64_t>(device.is_cuda() ? device.index() : -1);
    std::vector<int64_t> grad(in.size());
    for (size_t i = 0; i < in.size(); ++i) grad[i] = in[i].requires_grad() ? 1 : 0;
    ctx->saved_data["needs_grad"] = grad;
    ctx->save_for_backward(in);
    return run_checkpoint_fn(fn, in);  // grad mode is off inside a custom Function's forward
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto needs = ctx->saved_data["needs_grad"].toIntVector();
    std::vector<at::Tensor> in;
    in.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      auto d = saved[i].detach();
      if (needs[i] != 0) d.requires_grad_(true);
      in.push_back(d);
    }
    RngState first;
    int64_t dev = ctx->saved_data["rng_device"].toInt();
    first.device = dev < 0 ? at::Device(at::kCPU) : at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(dev));
    first.cpu = saved_tensor(ctx, "rng_cpu");
    first.cuda = saved_tensor(ctx, "rng_cuda");
    auto now = save_rng(first.device);
    std::vector<at::Tensor> out;
    restore_rng(first);
    try {
      at::AutoGradMode enable(true);
      out = run_checkpoint_fn(ctx->saved_data["fn"].toInt(), in);
    } catch (...) {
      restore_rng(now);
      throw;
    }
    restore_rng(now);
    torch::autograd::variable_list roots, root_grads;
    for (size_t i = 0; i < out.size() && i < grads.size(); ++i)
      if (out[i].requires_grad() && grads[i].defined()) {
        roots.push_back(out[i]);
        root_grads.push_back(grads[i]);
      }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    torch::autograd::variable_list result;
    result.reserve(in.size() + 2);
    result.emplace_back();  // fn
    for (auto& x : in) result.push_back(x.requires_grad() ? x.grad() : at::Tensor());
    result.emplace_back();  // anchor
    return result;
  }
};
}  // namespace

// Summed cross-entropy of hidden (N, H) · weight (V, H)ᵀ against targets (N), `chunk` rows at a time (<= 0: a size
// that keeps one chunk's fp32 logits near 256 MB).
FT_API T ft_linear_cross_entropy(T hidden, T weight, T targets, int64_t ignore_index, int64_t chunk) {
  FT_TRY(nullptr, {
    TORCH_CHECK(hidden->dim() == 2 && weight->dim() == 2 && hidden->size(1) == weight->size(1),
                "linear_cross_entropy: hidden (N, H) and weight (V, H) expected, got ", hidden->sizes(), " and ", weight->sizes());
    TORCH_CHECK(targets->dim() == 1 && targets->size(0) == hidden->size(0),
                "linear_cross_entropy: targets (N) expected, got ", targets->sizes(), " for ", hidden->size(0), " rows");
    if (chunk <= 0) chunk = std::max<int64_t>(64, ((int64_t{1} << 26) / std::max<int64_t>(1, weight->size(0))) / 64 * 64);
    bool grad = at::GradMode::is_enabled() && (hidden->requires_grad() || weight->requires_grad());
    if (!grad) return wrap(LinearCrossEntropy::chunked(*hidden, *weight, *targets, ignore_index, chunk, nullptr, nullptr));
    return wrap(LinearCrossEntropy::apply(*hidden, *weight, *targets, ignore_index, chunk));
  })
}

// Global-norm clipping that stays on the device (no host read of the norm, unlike ft_clip_grad_norm): multi-tensor
// norms, coef = min(1, max_norm / (norm + 1e-6)), grads scaled in place (torch.nn.utils.clip_grad_norm_'s math).
FT_API int ft_clip_grad_norm_async(T* params, int n, double max_norm) {
  FT_TRY(-1, {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> grads;
    for (int i = 0; i < n; ++i) {
      const auto& g = params[i]->grad();
      if (g.defined()) grads.push_back(g);
    }
    if (grads.empty()) return 0;
    auto acc = grads[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    std::vector<at::Tensor> norms;
    for (auto& x : at::_foreach_norm(grads, 2)) norms.push_back(x.to(acc));
    auto coef = (max_norm / (at::stack(norms).norm(2) + 1e-6)).clamp_max(1.0);
#if FT_AT_LEAST(2, 1)
    at::_foreach_mul_(grads, coef);
#else
    for (auto& g : grads) g.mul_(coef);
#endif
    return 0;
  })
}

FT_API void ft_set_checkpoint_callback(CheckpointCallback cb) { g_checkpoint_cb.store(cb); }
// Lets a callback report an error message on the calling thread (returned by ft_last_error / rethrown by the caller).
FT_API void ft_set_error(const char* message) { set_error(message); }

// Runs C# function `fn` on inputs under activation checkpointing; writes up to `cap` output handles, returns their count.
FT_API int ft_checkpoint(int64_t fn, T* inputs, int n, T* outputs, int cap) {
  FT_TRY(-1, {
    auto in = list(inputs, n);
    auto anchor = at::empty({0}, in.empty() ? at::TensorOptions() : in[0].options().dtype(at::kFloat)).requires_grad_(true);
    auto out = CheckpointFunction::apply(fn, at::TensorList(in), anchor);
    TORCH_CHECK(static_cast<int>(out.size()) <= cap, "checkpointed function returned ", out.size(), " tensors, expected at most ", cap);
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = wrap(std::move(out[i]));
    return static_cast<int>(out.size());
  })
}
// ================================================================ end gpu-perf

// ================================================================ fused elementwise ops (rotary, SwiGLU)
// Each is one autograd node; on CUDA (fp32/fp16/bf16, built with nvcc: FT_CUDA_KERNELS) one kernel forward and one
// backward (fused_kernels.cu), elsewhere the same formulas in at:: ops. They replace chains of elementwise kernels
// (rotary: a cat, a neg, two muls and an add each way, and x kept for backward; SwiGLU: silu, mul, and their
// backward) whose memory traffic was ~40% of a step's kernel time on the GPU.
namespace {

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}
// The transpose of rotate_half: cat(v2, −v1).
at::Tensor rotate_half_t(const at::Tensor& v) {
  const int64_t h = v.size(-1) / 2;
  return at::cat({v.narrow(-1, h, h), -v.narrow(-1, 0, h)}, -1);
}

// x (B, T, H, D); cos, sin (T, D) or (B, T, D), broadcast over the heads. backward: x is the upstream gradient and
// the result x·cos + rotate_halfᵀ(x·sin); else x·cos + rotate_half(x)·sin.
at::Tensor rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
#ifdef FT_CUDA_KERNELS
  if (fused_kernel_for(x)) {
    c10::cuda::CUDAGuard guard(x.device());
    // The kernel reads any (B, T, H) strides: backward's upstream gradient is the transposed view of attention's
    // (B, H, T, D) gradient, read in place instead of copied.
    auto xc = x.stride(3) == 1 ? x : x.contiguous();
    auto c = cos.to(x.scalar_type()).contiguous();
    auto s = sin.to(x.scalar_type()).contiguous();
    auto out = at::empty(xc.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t d = xc.size(3);
    fused_check(ft_fused_rotary(xc.data_ptr(), c.data_ptr(), s.data_ptr(), out.data_ptr(), xc.numel() / d, d,
                                xc.size(2), xc.size(1), xc.stride(0), xc.stride(1), xc.stride(2), c.numel() / d,
                                backward ? 1 : 0, fused_dtype(xc.scalar_type()),
                                at::cuda::getCurrentCUDAStream().stream()),
                "rotary");
    return out;
  }
#endif
  auto c = cos.unsqueeze(-2), s = sin.unsqueeze(-2);  // (T, 1, D) or (B, T, 1, D)
  return backward ? x * c + rotate_half_t(x * s) : x * c + rotate_half(x) * s;
}

struct Rotary : public torch::autograd::Function<Rotary> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});  // not x: the op is linear in x
    return rotary_apply(x, cos, sin, false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {rotary_apply(grads[0], saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
#ifdef FT_CUDA_KERNELS
    if (fused_kernel_for(gate)) {
      c10::cuda::CUDAGuard guard(gate.device());
      auto g = gate.contiguous(), u = up.contiguous();
      auto y = at::empty(g.sizes(), g.options());
      fused_check(ft_fused_swiglu_forward(g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(),
                                          fused_dtype(g.scalar_type()), at::cuda::getCurrentCUDAStream().stream()),
                  "swiglu");
      return y;
    }
#endif
    return at::silu(gate) * up;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& gate = saved[0];
    const auto& up = saved[1];
    auto dy = grads[0].to(gate.scalar_type());
#ifdef FT_CUDA_KERNELS
    if (fused_kernel_for(gate)) {
      c10::cuda::CUDAGuard guard(gate.device());
      auto g = gate.contiguous(), u = up.contiguous(), dyc = dy.contiguous();
      auto dg = at::empty(g.sizes(), g.options()), du = at::empty(u.sizes(), u.options());
      fused_check(ft_fused_swiglu_backward(dyc.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                           g.numel(), fused_dtype(g.scalar_type()),
                                           at::cuda::getCurrentCUDAStream().stream()),
                  "swiglu backward");
      return {dg, du};
    }
#endif
    // What autograd computes for silu(gate) * up, op for op.
    return {at::silu_backward(dy * up, gate), dy * at::silu(gate)};
  }
};
}  // namespace

FT_API int ft_fused_kernels_available() {
#ifdef FT_CUDA_KERNELS
  return 1;
#else
  return 0;
#endif
}

// HF rotary embedding on x (B, T, H, D) (heads before the transpose to (B, H, T, D)): x·cos + rotate_half(x)·sin
// with cos, sin (T, D) or, for per-row positions, (B, T, D), broadcast over H. cos and sin get no gradient.
FT_API T ft_rotary(T x, T cos, T sin) {
  FT_TRY(nullptr, {
    TORCH_CHECK(x->dim() == 4, "rotary: x must be (B, T, H, D), got ", x->sizes());
    const int64_t b = x->size(0), t = x->size(1), d = x->size(3);
    TORCH_CHECK(d > 0 && d % 2 == 0, "rotary: the head dimension must be even, got ", d);
    TORCH_CHECK(cos->sizes() == sin->sizes(), "rotary: cos ", cos->sizes(), " and sin ", sin->sizes(), " differ in shape");
    const bool per_time = cos->dim() == 2 && cos->size(0) == t && cos->size(1) == d;
    const bool per_row = cos->dim() == 3 && cos->size(0) == b && cos->size(1) == t && cos->size(2) == d;
    TORCH_CHECK(per_time || per_row, "rotary: cos and sin must be (T, D) = (", t, ", ", d, ") or (B, T, D) = (", b, ", ",
                t, ", ", d, "), got ", cos->sizes());
    TORCH_CHECK(cos->device() == x->device() && sin->device() == x->device(), "rotary: x is on ", x->device(),
                " but cos/sin on ", cos->device());
    TORCH_CHECK(cos->scalar_type() == x->scalar_type() && sin->scalar_type() == x->scalar_type(), "rotary: x is ",
                x->scalar_type(), " but cos/sin are ", cos->scalar_type(), "/", sin->scalar_type());
    return wrap(Rotary::apply(*x, *cos, *sin));
  })
}

// silu(gate)·up (the Llama MLP's SwiGLU); gate and up of one shape, dtype and device.
FT_API T ft_swiglu(T gate, T up) {
  FT_TRY(nullptr, {
    TORCH_CHECK(gate->sizes() == up->sizes(), "swiglu: gate ", gate->sizes(), " and up ", up->sizes(), " differ in shape");
    TORCH_CHECK(gate->scalar_type() == up->scalar_type(), "swiglu: gate is ", gate->scalar_type(), " but up is ", up->scalar_type());
    TORCH_CHECK(gate->device() == up->device(), "swiglu: gate is on ", gate->device(), " but up on ", up->device());
    return wrap(SwiGlu::apply(*gate, *up));
  })
}
// ================================================================ end fused elementwise ops
