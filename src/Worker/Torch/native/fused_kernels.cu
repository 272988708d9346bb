// Fused training kernels: HF rotary embedding and SwiGLU (silu(gate)·up), one kernel each way; the rows of a
// cross-entropy (loss and softmax − one-hot); and the exact three-term bf16 split of fp32 that LoRA's exact node
// (shim.cpp) runs its fp32 products on.
// Plain CUDA C++ without torch headers (shim.cpp hands over raw pointers of contiguous tensors and its current
// stream), so this file builds with nothing but the CUDA toolkit. Storage is fp32, fp16 or bf16; the math is fp32,
// so every output is rounded once (the composite at:: version rounds after every op).
#include "fused_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
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

// x is (B, T, H, D) with any strides over B, T, H (the last dimension contiguous): in backward the upstream gradient
// is the transposed view of attention's (B, H, T, D) gradient, and reading it in place saves a strided copy of it
// (the slowest elementwise kernel of the 2026-12-01 profile). Row r = (b·T + t)·H + h; out is contiguous (rows, d).
struct RotaryGeometry {
  int64_t rows, d, heads, seq, sb, st, sh, table_rows;
};

__device__ __forceinline__ int64_t rotary_row_offset(const RotaryGeometry& g, int64_t row, int64_t* table_row) {
  const int64_t h = row % g.heads, bt = row / g.heads;
  const int64_t t = bt % g.seq, b = bt / g.seq;
  *table_row = (bt % g.table_rows) * g.d;
  return b * g.sb + t * g.st + h * g.sh;
}

// backward = 0: x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x2, x1);
// backward = 1: x·cos + rotate_halfᵀ(x·sin), rotate_halfᵀ(v) = cat(v2, −v1).
__device__ __forceinline__ void rotary_pair(float x1, float x2, float c1, float c2, float s1, float s2, int backward,
                                            float* o1, float* o2) {
  if (backward) {
    *o1 = x1 * c1 + x2 * s2;
    *o2 = x2 * c2 - x1 * s1;
  } else {
    *o1 = x1 * c1 - x2 * s1;
    *o2 = x2 * c2 + x1 * s2;
  }
}

// Scalar form, any alignment. Block (tx, ty): ty rows per block, tx threads along the half row; a thread handles
// the pair (j, j + d/2), so both halves are read and written coalesced.
template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                              T* __restrict__ out, RotaryGeometry g, int backward) {
  const int64_t half = g.d / 2;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < g.rows; row += row_stride) {
    int64_t trow;
    const T* xr = x + rotary_row_offset(g, row, &trow);
    T* outr = out + row * g.d;
    const T* cr = cos_t + trow;
    const T* sr = sin_t + trow;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      float o1, o2;
      rotary_pair(ft_load(xr, j), ft_load(xr, j + half), ft_load(cr, j), ft_load(cr, j + half), ft_load(sr, j),
                  ft_load(sr, j + half), backward, &o1, &o2);
      ft_store(outr, j, o1);
      ft_store(outr, j + half, o2);
    }
  }
}

// 16-byte vector form (8 bf16/fp16 or 4 fp32 per load): one thread per (row, vector of the half row). The scalar
// form's 2-byte loads kept the kernel at about a third of the memory bandwidth.
template <typename T>
__global__ void rotary_vec_kernel(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                                  T* __restrict__ out, RotaryGeometry g, int backward) {
  constexpr int V = 16 / sizeof(T);
  const int64_t half = g.d / 2, nv = half / V, total = g.rows * nv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / nv, j = (i % nv) * V;
    int64_t trow;
    const T* xr = x + rotary_row_offset(g, row, &trow);
    const uint4 x1v = *reinterpret_cast<const uint4*>(xr + j), x2v = *reinterpret_cast<const uint4*>(xr + j + half);
    const uint4 c1v = *reinterpret_cast<const uint4*>(cos_t + trow + j);
    const uint4 c2v = *reinterpret_cast<const uint4*>(cos_t + trow + j + half);
    const uint4 s1v = *reinterpret_cast<const uint4*>(sin_t + trow + j);
    const uint4 s2v = *reinterpret_cast<const uint4*>(sin_t + trow + j + half);
    const T *x1 = reinterpret_cast<const T*>(&x1v), *x2 = reinterpret_cast<const T*>(&x2v);
    const T *c1 = reinterpret_cast<const T*>(&c1v), *c2 = reinterpret_cast<const T*>(&c2v);
    const T *s1 = reinterpret_cast<const T*>(&s1v), *s2 = reinterpret_cast<const T*>(&s2v);
    uint4 o1v, o2v;
    T *o1 = reinterpret_cast<T*>(&o1v), *o2 = reinterpret_cast<T*>(&o2v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float a, b;
      rotary_pair(ft_load(x1, k), ft_load(x2, k), ft_load(c1, k), ft_load(c2, k), ft_load(s1, k), ft_load(s2, k),
                  backward, &a, &b);
      ft_store(o1, k, a);
      ft_store(o2, k, b);
    }
    T* outr = out + row * g.d;
    *reinterpret_cast<uint4*>(outr + j) = o1v;
    *reinterpret_cast<uint4*>(outr + j + half) = o2v;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
int rotary(const void* x, const void* c, const void* s, void* out, const RotaryGeometry& g, int backward,
           cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  const int64_t half = g.d / 2;
  const bool vec = half % V == 0 && g.sb % V == 0 && g.st % V == 0 && g.sh % V == 0 && aligned16(x) &&
                   aligned16(c) && aligned16(s) && aligned16(out);
  if (vec) {
    rotary_vec_kernel<T><<<blocks_for(g.rows * (half / V), kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(c), static_cast<const T*>(s), static_cast<T*>(out), g,
        backward);
    return launch_status();
  }
  unsigned tx = 32;
  while (tx < half && tx < 128) tx *= 2;
  const unsigned ty = kThreads / tx;
  const dim3 block(tx, ty);
  rotary_kernel<T><<<blocks_for(g.rows, ty), block, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(c), static_cast<const T*>(s), static_cast<T*>(out), g,
      backward);
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

// ---- cross-entropy rows (the loss of the fused linear + cross-entropy, chunk by chunk)
// One block per row of logits (rows, v): an online log-sum-exp over the row in fp32 (one read), then, for the
// gradient, softmax − one-hot(target) written in the logits' dtype (a second read and one write, in place when
// grad == logits). The composite form it replaces cast the chunk to fp32, ran log_softmax, exp and scatter_add over
// it and cast back: five passes over a (rows × 128k) fp32 tensor per chunk, ~8% of a 1B model's step.

// (m, s) is a running log-sum-exp: the row's max so far and Σ exp(x − m). NaN inputs make s NaN; −inf ones add 0.
__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else if (x > -INFINITY) {
    s += expf(x - m);
  } else if (x != x) {
    s = NAN;
  }
}

__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;  // also −inf with −inf, where s2 is 0 (or NaN, which must survive)
  } else {
    s += s2 * expf(m2 - m);
  }
}

constexpr int kCeThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kCeThreads)
    cross_entropy_kernel(const T* logits, const int64_t* __restrict__ targets, int64_t v, int64_t ignore_index,
                         float* __restrict__ loss, T* grad, int vec) {
  constexpr int V = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* lr = logits + row * v;
  T* gr = grad ? grad + row * v : nullptr;
  const int64_t target = targets[row];
  const bool ignored = target == ignore_index;
  const int64_t nvec = vec ? v / V : 0;
  const int64_t tail = nvec * V;

  if (ignored) {  // no loss and a zero gradient row
    if (threadIdx.x == 0) loss[row] = 0.0f;
    if (gr) {
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) reinterpret_cast<uint4*>(gr)[i] = make_uint4(0, 0, 0, 0);
      for (int64_t i = tail + threadIdx.x; i < v; i += blockDim.x) ft_store(gr, i, 0.0f);
    }
    return;
  }

  __shared__ float s_target;
  __shared__ float s_m[kCeThreads / 32], s_s[kCeThreads / 32];
  __shared__ float s_lse;
  // Read before any thread overwrites the row in place; a target outside [0, v) makes the loss NaN, which the
  // trainer reports as a non-finite loss (a gather would stop the device with an assertion instead).
  if (threadIdx.x == 0) s_target = target >= 0 && target < v ? ft_load(lr, target) : NAN;

  float m = -INFINITY, s = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 u = reinterpret_cast<const uint4*>(lr)[i];
    const T* p = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < V; ++k) lse_add(m, s, ft_load(p, k));
  }
  for (int64_t i = tail + threadIdx.x; i < v; i += blockDim.x) lse_add(m, s, ft_load(lr, i));

#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_m[warp] = m;
    s_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = s_m[0], bs = s_s[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) lse_combine(bm, bs, s_m[w], s_s[w]);
    const float lse = bm + logf(bs);
    s_lse = lse;
    loss[row] = lse - s_target;
  }
  __syncthreads();
  if (!gr) return;

  const float lse = s_lse;
  // Each element is read and written by the same thread, so grad may alias logits.
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 u = reinterpret_cast<const uint4*>(lr)[i];
    const T* p = reinterpret_cast<const T*>(&u);
    uint4 o;
    T* q = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t j = i * V + k;
      ft_store(q, k, expf(ft_load(p, k) - lse) - (j == target ? 1.0f : 0.0f));
    }
    reinterpret_cast<uint4*>(gr)[i] = o;
  }
  for (int64_t i = tail + threadIdx.x; i < v; i += blockDim.x)
    ft_store(gr, i, expf(ft_load(lr, i) - lse) - (i == target ? 1.0f : 0.0f));
}

template <typename T>
int cross_entropy(const void* logits, const int64_t* targets, int64_t rows, int64_t v, int64_t ignore_index,
                  float* loss, void* grad, cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  const int vec = v % V == 0 && aligned16(logits) && (grad == nullptr || aligned16(grad)) ? 1 : 0;
  cross_entropy_kernel<T><<<static_cast<unsigned>(rows), kCeThreads, 0, stream>>>(
      static_cast<const T*>(logits), targets, v, ignore_index, loss, static_cast<T*>(grad), vec);
  return launch_status();
}

// ---- three-term bf16 split of fp32 (for fp32 adapter math on bf16 tensor cores)
// v = scale · Σ_p src[row, p, col] (summed smallest plane first), written as hi + mid + lo with each term the bf16
// rounding of what the previous ones left: hi = bf16(v), mid = bf16(v − hi), lo = bf16(v − hi − mid). Both
// subtractions are exact in fp32 and the last remainder has at most 8 significant bits, so hi + mid + lo = v exactly
// (for v in bf16's normal range, which is fp32's). Layout: planar (3, rows, cols) or interleaved (rows, 3, cols).
__global__ void split3_kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t rs, int64_t ps,
                              int64_t cs, int parts, float scale, __nv_bfloat16* __restrict__ dst, int planar) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / cols, col = i % cols;
    const float* p = src + row * rs + col * cs;
    float v = p[(parts - 1) * ps];
    for (int q = parts - 2; q >= 0; --q) v += p[q * ps];
    v *= scale;
    const __nv_bfloat16 hi = __float2bfloat16(v);
    const float r1 = v - __bfloat162float(hi);
    const __nv_bfloat16 mid = __float2bfloat16(r1);
    const __nv_bfloat16 lo = __float2bfloat16(r1 - __bfloat162float(mid));
    if (planar) {
      dst[i] = hi;
      dst[n + i] = mid;
      dst[2 * n + i] = lo;
    } else {
      __nv_bfloat16* d = dst + (row * 3) * cols + col;
      d[0] = hi;
      d[cols] = mid;
      d[2 * cols] = lo;
    }
  }
}

// DoRA's output y = bf16(f[col]·(v + d)) over bf16 (rows, cols): the frozen product v and the adapter's d summed and
// scaled in fp32 and rounded once, so a change of f below bf16's resolution still moves y on average, as in PEFT's fp32
// sum. Rounding v + d to bf16 before the scale would lose it.
__global__ void dora_combine_kernel(const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ d,
                                    const float* __restrict__ f, __nv_bfloat16* __restrict__ y, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = __float2bfloat16(f[i % cols] * (__bfloat162float(v[i]) + __bfloat162float(d[i])));
}

// DoRA's ∂L/∂f, f = m / ‖W + s·B·A‖: out[col] = Σ_row a[row, col]·b[row, col] over bf16 (rows, cols), fp32 products
// and sums. Stage one: each thread sums one column over one chunk of rows (a warp reads consecutive columns of a row:
// coalesced) into partial (chunks, cols); stage two adds the chunks in order, so the result is deterministic.
__global__ void col_dot_partial_kernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                       int64_t rows, int64_t cols, int64_t rows_per_chunk, float* __restrict__ partial) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float acc0 = 0.f, acc1 = 0.f;
  int64_t r = r0;
  for (; r + 1 < r1; r += 2) {
    acc0 += __bfloat162float(a[r * cols + col]) * __bfloat162float(b[r * cols + col]);
    acc1 += __bfloat162float(a[(r + 1) * cols + col]) * __bfloat162float(b[(r + 1) * cols + col]);
  }
  if (r < r1) acc0 += __bfloat162float(a[r * cols + col]) * __bfloat162float(b[r * cols + col]);
  partial[static_cast<int64_t>(blockIdx.y) * cols + col] = acc0 + acc1;
}

__global__ void col_sum_kernel(const float* __restrict__ partial, int64_t chunks, int64_t cols, float* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * cols + col];
  out[col] = acc;
}

}  // namespace

extern "C" int ft_fused_rotary(const void* x, const void* cos, const void* sin, void* out, int64_t rows, int64_t d,
                               int64_t heads, int64_t seq, int64_t stride_b, int64_t stride_t, int64_t stride_h,
                               int64_t table_rows, int backward, int dtype, ft_stream_t stream) {
  if (d <= 0 || d % 2 != 0 || heads <= 0 || seq <= 0 || table_rows <= 0 || rows < 0 || rows % (heads * seq) != 0)
    return FT_FUSED_BAD_SHAPE;
  if (rows == 0) return FT_FUSED_OK;  // a launch of zero blocks is an error
  const RotaryGeometry g{rows, d, heads, seq, stride_b, stride_t, stride_h, table_rows};
  switch (dtype) {
    case FT_FUSED_F32: return rotary<float>(x, cos, sin, out, g, backward, stream);
    case FT_FUSED_F16: return rotary<__half>(x, cos, sin, out, g, backward, stream);
    case FT_FUSED_BF16: return rotary<__nv_bfloat16>(x, cos, sin, out, g, backward, stream);
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

extern "C" int ft_fused_cross_entropy(const void* logits, const int64_t* targets, int64_t rows, int64_t v,
                                      int64_t ignore_index, float* loss, void* grad, int dtype, ft_stream_t stream) {
  if (rows < 0 || v <= 0 || rows > 0x7fffffff) return FT_FUSED_BAD_SHAPE;
  if (rows == 0) return FT_FUSED_OK;
  switch (dtype) {
    case FT_FUSED_F32: return cross_entropy<float>(logits, targets, rows, v, ignore_index, loss, grad, stream);
    case FT_FUSED_F16: return cross_entropy<__half>(logits, targets, rows, v, ignore_index, loss, grad, stream);
    case FT_FUSED_BF16:
      return cross_entropy<__nv_bfloat16>(logits, targets, rows, v, ignore_index, loss, grad, stream);
    default: return FT_FUSED_BAD_DTYPE;
  }
}

extern "C" int ft_fused_split3(const float* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t part_stride,
                               int64_t col_stride, int parts, float scale, void* dst, int planar, ft_stream_t stream) {
  if (rows < 0 || cols < 0 || parts < 1) return FT_FUSED_BAD_SHAPE;
  if (rows == 0 || cols == 0) return FT_FUSED_OK;
  split3_kernel<<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(
      src, rows, cols, row_stride, part_stride, col_stride, parts, scale, static_cast<__nv_bfloat16*>(dst), planar);
  return launch_status();
}

extern "C" int ft_fused_dora_combine(const void* v, const void* d, const float* f, void* y, int64_t rows, int64_t cols,
                                     ft_stream_t stream) {
  if (rows < 0 || cols < 0) return FT_FUSED_BAD_SHAPE;
  if (rows == 0 || cols == 0) return FT_FUSED_OK;
  dora_combine_kernel<<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(v), static_cast<const __nv_bfloat16*>(d), f, static_cast<__nv_bfloat16*>(y), rows, cols);
  return launch_status();
}

extern "C" int ft_fused_col_dot(const void* a, const void* b, int64_t rows, int64_t cols, int64_t chunks, float* partial,
                                float* out, ft_stream_t stream) {
  if (rows < 0 || cols < 0 || chunks < 1 || chunks > 65535) return FT_FUSED_BAD_SHAPE;
  if (cols == 0) return FT_FUSED_OK;
  const int64_t per_chunk = rows == 0 ? 1 : (rows + chunks - 1) / chunks;
  const dim3 grid(blocks_for(cols, kThreads), static_cast<unsigned>(chunks));
  col_dot_partial_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(a),
                                                        static_cast<const __nv_bfloat16*>(b), rows, cols, per_chunk,
                                                        partial);
  const int rc = launch_status();
  if (rc != FT_FUSED_OK) return rc;
  col_sum_kernel<<<blocks_for(cols, kThreads), kThreads, 0, stream>>>(partial, chunks, cols, out);
  return launch_status();
}

extern "C" const char* ft_fused_error_string(int code) {
  switch (code) {
    case FT_FUSED_OK: return "no error";
    case FT_FUSED_BAD_DTYPE: return "unsupported dtype (fp32, fp16 and bf16 only)";
    case FT_FUSED_BAD_SHAPE: return "bad shape (rotary: an even head dimension and rows = B·T·H; cross-entropy: v > 0, rows < 2^31)";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}
