// Fused elementwise training ops, one kernel each way: HF rotary embedding and SwiGLU (silu(gate)·up).
// Plain CUDA C++ without torch headers (shim.cpp hands over raw pointers of contiguous tensors and its current
// stream), so this file builds with nothing but the CUDA toolkit. Storage is fp32, fp16 or bf16; the math is fp32,
// so every output is rounded once (the composite at:: version rounds after every op).
#include "fused_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Overloads rather than template specialisations: one spelling per storage type, exact matches only.
__device__ __forceinline__ float ft_load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ft_load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ft_load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void ft_store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void ft_store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void ft_store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// expf, not __expf: the fp32 results are compared with at::silu to ~1e-6.
__device__ __forceinline__ float ft_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr int kThreads = 256;
// Grid-stride loops cover whatever a capped grid does not.
constexpr int64_t kMaxBlocks = 1 << 18;

unsigned blocks_for(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

int launch_status() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? FT_FUSED_OK : static_cast<int>(e);
}

// Block (tx, ty): ty rows per block, tx threads along the half row; a thread handles the pair (j, j + d/2), so
// both halves are read and written coalesced and the table row is computed once per row, not per element.
template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                              T* __restrict__ out, int64_t rows, int64_t d, int64_t heads, int64_t table_rows,
                              int backward) {
  const int64_t half = d / 2;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_stride) {
    const T* xr = x + row * d;
    T* outr = out + row * d;
    const int64_t trow = ((row / heads) % table_rows) * d;
    const T* cr = cos_t + trow;
    const T* sr = sin_t + trow;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      const float x1 = ft_load(xr, j), x2 = ft_load(xr, j + half);
      const float c1 = ft_load(cr, j), c2 = ft_load(cr, j + half);
      const float s1 = ft_load(sr, j), s2 = ft_load(sr, j + half);
      float o1, o2;
      if (backward) {
        // x·cos + rotate_halfᵀ(x·sin), rotate_halfᵀ(v) = cat(v2, −v1)
        o1 = x1 * c1 + x2 * s2;
        o2 = x2 * c2 - x1 * s1;
      } else {
        // x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x2, x1)
        o1 = x1 * c1 - x2 * s1;
        o2 = x2 * c2 + x1 * s2;
      }
      ft_store(outr, j, o1);
      ft_store(outr, j + half, o2);
    }
  }
}

template <typename T>
int rotary(const void* x, const void* c, const void* s, void* out, int64_t rows, int64_t d, int64_t heads,
           int64_t table_rows, int backward, cudaStream_t stream) {
  const int64_t half = d / 2;
  unsigned tx = 32;
  while (tx < half && tx < 128) tx *= 2;
  const unsigned ty = kThreads / tx;
  const dim3 block(tx, ty);
  rotary_kernel<T><<<blocks_for(rows, ty), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(c), static_cast<const T*>(s), static_cast<T*>(out), rows, d,
      heads, table_rows, backward);
  return launch_status();
}

template <typename T>
__global__ void swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = ft_load(gate, i);
    ft_store(y, i, g * ft_sigmoid(g) * ft_load(up, i));
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ gate, const T* __restrict__ up,
                                       T* __restrict__ d_gate, T* __restrict__ d_up, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = ft_load(gate, i), u = ft_load(up, i), dout = ft_load(dy, i);
    const float s = ft_sigmoid(g);
    ft_store(d_gate, i, dout * u * s * (1.0f + g * (1.0f - s)));
    ft_store(d_up, i, dout * g * s);
  }
}

// The same two kernels over 16-byte vectors (8 bf16/fp16 or 4 fp32 per load): one scalar bf16 load per thread left
// the forward at about a quarter of the H200's memory bandwidth (profile of 2026-12-01). The tail that does not fill
// a vector, and any pointer that is not 16-byte aligned, take the scalar kernels above.
template <typename T>
__global__ void swiglu_forward_vec_kernel(const uint4* __restrict__ gate, const uint4* __restrict__ up,
                                          uint4* __restrict__ y, int64_t nvec) {
  constexpr int V = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const uint4 gv = gate[i], uv = up[i];
    uint4 ov;
    const T* gp = reinterpret_cast<const T*>(&gv);
    const T* upp = reinterpret_cast<const T*>(&uv);
    T* op = reinterpret_cast<T*>(&ov);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float g = ft_load(gp, k);
      ft_store(op, k, g * ft_sigmoid(g) * ft_load(upp, k));
    }
    y[i] = ov;
  }
}

template <typename T>
__global__ void swiglu_backward_vec_kernel(const uint4* __restrict__ dy, const uint4* __restrict__ gate,
                                           const uint4* __restrict__ up, uint4* __restrict__ d_gate,
                                           uint4* __restrict__ d_up, int64_t nvec) {
  constexpr int V = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const uint4 dv = dy[i], gv = gate[i], uv = up[i];
    uint4 dgv, duv;
    const T* dp = reinterpret_cast<const T*>(&dv);
    const T* gp = reinterpret_cast<const T*>(&gv);
    const T* upp = reinterpret_cast<const T*>(&uv);
    T* dgp = reinterpret_cast<T*>(&dgv);
    T* dup = reinterpret_cast<T*>(&duv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float g = ft_load(gp, k), u = ft_load(upp, k), dout = ft_load(dp, k);
      const float s = ft_sigmoid(g);
      ft_store(dgp, k, dout * u * s * (1.0f + g * (1.0f - s)));
      ft_store(dup, k, dout * g * s);
    }
    d_gate[i] = dgv;
    d_up[i] = duv;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
int swiglu_forward(const void* gate, const void* up, void* y, int64_t n, cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  int64_t done = 0;
  if (aligned16(gate) && aligned16(up) && aligned16(y) && n >= V) {
    const int64_t nvec = n / V;
    swiglu_forward_vec_kernel<T><<<blocks_for(nvec, kThreads), kThreads, 0, stream>>>(
        static_cast<const uint4*>(gate), static_cast<const uint4*>(up), static_cast<uint4*>(y), nvec);
    done = nvec * V;
  }
  if (done < n) {
    swiglu_forward_kernel<T><<<blocks_for(n - done, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(gate) + done, static_cast<const T*>(up) + done, static_cast<T*>(y) + done, n - done);
  }
  return launch_status();
}

template <typename T>
int swiglu_backward(const void* dy, const void* gate, const void* up, void* d_gate, void* d_up, int64_t n,
                    cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  int64_t done = 0;
  if (aligned16(dy) && aligned16(gate) && aligned16(up) && aligned16(d_gate) && aligned16(d_up) && n >= V) {
    const int64_t nvec = n / V;
    swiglu_backward_vec_kernel<T><<<blocks_for(nvec, kThreads), kThreads, 0, stream>>>(
        static_cast<const uint4*>(dy), static_cast<const uint4*>(gate), static_cast<const uint4*>(up),
        static_cast<uint4*>(d_gate), static_cast<uint4*>(d_up), nvec);
    done = nvec * V;
  }
  if (done < n) {
    swiglu_backward_kernel<T><<<blocks_for(n - done, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(dy) + done, static_cast<const T*>(gate) + done, static_cast<const T*>(up) + done,
        static_cast<T*>(d_gate) + done, static_cast<T*>(d_up) + done, n - done);
  }
  return launch_status();
}

}  // namespace

extern "C" int ft_fused_rotary(const void* x, const void* cos, const void* sin, void* out, int64_t rows, int64_t d,
                               int64_t heads, int64_t table_rows, int backward, int dtype, ft_stream_t stream) {
  if (d <= 0 || d % 2 != 0 || heads <= 0 || table_rows <= 0 || rows < 0) return FT_FUSED_BAD_SHAPE;
  if (rows == 0) return FT_FUSED_OK;  // a launch of zero blocks is an error
  switch (dtype) {
    case FT_FUSED_F32: return rotary<float>(x, cos, sin, out, rows, d, heads, table_rows, backward, stream);
    case FT_FUSED_F16: return rotary<__half>(x, cos, sin, out, rows, d, heads, table_rows, backward, stream);
    case FT_FUSED_BF16: return rotary<__nv_bfloat16>(x, cos, sin, out, rows, d, heads, table_rows, backward, stream);
    default: return FT_FUSED_BAD_DTYPE;
  }
}

extern "C" int ft_fused_swiglu_forward(const void* gate, const void* up, void* y, int64_t n, int dtype,
                                       ft_stream_t stream) {
  if (n < 0) return FT_FUSED_BAD_SHAPE;
  if (n == 0) return FT_FUSED_OK;
  switch (dtype) {
    case FT_FUSED_F32: return swiglu_forward<float>(gate, up, y, n, stream);
    case FT_FUSED_F16: return swiglu_forward<__half>(gate, up, y, n, stream);
    case FT_FUSED_BF16: return swiglu_forward<__nv_bfloat16>(gate, up, y, n, stream);
    default: return FT_FUSED_BAD_DTYPE;
  }
}

extern "C" int ft_fused_swiglu_backward(const void* dy, const void* gate, const void* up, void* d_gate, void* d_up,
                                        int64_t n, int dtype, ft_stream_t stream) {
  if (n < 0) return FT_FUSED_BAD_SHAPE;
  if (n == 0) return FT_FUSED_OK;
  switch (dtype) {
    case FT_FUSED_F32: return swiglu_backward<float>(dy, gate, up, d_gate, d_up, n, stream);
    case FT_FUSED_F16: return swiglu_backward<__half>(dy, gate, up, d_gate, d_up, n, stream);
    case FT_FUSED_BF16: return swiglu_backward<__nv_bfloat16>(dy, gate, up, d_gate, d_up, n, stream);
    default: return FT_FUSED_BAD_DTYPE;
  }
}

extern "C" const char* ft_fused_error_string(int code) {
  switch (code) {
    case FT_FUSED_OK: return "no error";
    case FT_FUSED_BAD_DTYPE: return "unsupported dtype (fp32, fp16 and bf16 only)";
    case FT_FUSED_BAD_SHAPE: return "bad shape (the rotary head dimension must be even and positive)";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}
