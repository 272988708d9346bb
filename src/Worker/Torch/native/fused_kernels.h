// C interface of fused_kernels.cu (plain CUDA, no torch headers): launchers over raw device pointers of contiguous
// tensors, enqueued on the caller's stream. Each returns 0 or an error code for ft_fused_error_string. Only compiled
// when CMake finds nvcc next to a CUDA libtorch (FT_CUDA_KERNELS); shim.cpp maps at::ScalarType to the codes below.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// cudaStream_t is `struct CUstream_st*`; spelled out so that this header needs no CUDA header.
typedef struct CUstream_st* ft_stream_t;

enum { FT_FUSED_F32 = 0, FT_FUSED_F16 = 1, FT_FUSED_BF16 = 2 };
enum { FT_FUSED_OK = 0, FT_FUSED_BAD_DTYPE = -1, FT_FUSED_BAD_SHAPE = -2 };  // > 0: a cudaError_t

// HF rotary on x (B, T, H, D) with element strides (stride_b, stride_t, stride_h, 1), rows = B·T·H, d even; row
// r = (b·T + t)·H + h uses table row (r / heads) % table_rows of cos/sin (table_rows, d): cos (T, D) (table_rows = T)
// or per-batch cos (B, T, D) (table_rows = B·T). out is contiguous (rows, d) and may not alias x.
// backward = 0: out = x·cos + rotate_half(x)·sin; backward = 1: out = x·cos + rotate_halfᵀ(x·sin) (x is the
// upstream gradient then).
int ft_fused_rotary(const void* x, const void* cos, const void* sin, void* out, int64_t rows, int64_t d, int64_t heads,
                    int64_t seq, int64_t stride_b, int64_t stride_t, int64_t stride_h, int64_t table_rows,
                    int backward, int dtype, ft_stream_t stream);

// Cross-entropy over the rows of contiguous logits (rows, v) with int64 targets (rows): loss[r] = logsumexp − logit
// at the target (fp32; 0 where the target is ignore_index, NaN where it is outside [0, v)); when grad is not null,
// grad = softmax − one-hot(target) per row (zero rows where ignored), in the logits' dtype; grad may be logits.
int ft_fused_cross_entropy(const void* logits, const int64_t* targets, int64_t rows, int64_t v, int64_t ignore_index,
                           float* loss, void* grad, int dtype, ft_stream_t stream);

// y = silu(gate)·up over n elements.
int ft_fused_swiglu_forward(const void* gate, const void* up, void* y, int64_t n, int dtype, ft_stream_t stream);

// d_gate = dy·up·s·(1 + gate·(1 − s)), d_up = dy·gate·s with s = sigmoid(gate), over n elements.
int ft_fused_swiglu_backward(const void* dy, const void* gate, const void* up, void* d_gate, void* d_up, int64_t n,
                             int dtype, ft_stream_t stream);

// v[row, col] = scale · Σ_{p < parts} src[row·row_stride + p·part_stride + col·col_stride] (fp32) split into three bf16
// terms with hi + mid + lo = v: dst (bf16) is (3, rows, cols) when planar, else (rows, 3, cols).
int ft_fused_split3(const float* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t part_stride,
                    int64_t col_stride, int parts, float scale, void* dst, int planar, ft_stream_t stream);

// y = f[col]·(v + d) for contiguous bf16 (rows, cols) v, d, y and fp32 f (cols): fp32 sum and product, one rounding.
int ft_fused_dora_combine(const void* v, const void* d, const float* f, void* y, int64_t rows, int64_t cols,
                          ft_stream_t stream);

// out[col] = Σ_row a[row, col]·b[row, col] for contiguous bf16 (rows, cols), in fp32, deterministic: partial is fp32
// scratch of (chunks, cols), 1 ≤ chunks ≤ 65535 (rows are split into that many chunks).
int ft_fused_col_dot(const void* a, const void* b, int64_t rows, int64_t cols, int64_t chunks, float* partial,
                     float* out, ft_stream_t stream);

const char* ft_fused_error_string(int code);

#ifdef __cplusplus
}
#endif
