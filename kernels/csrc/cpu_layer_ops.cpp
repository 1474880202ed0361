// The elementwise parts of a decoder layer for the CPU, each one pass over its rows: RMSNorm (optionally after
// adding a residual), SiLU-and-multiply, and rotary embedding of Q and K.
//
// In PyTorch each is a chain of five to ten operators over a few kilobytes per row, and at decode batch sizes their
// fixed cost per operator, not the arithmetic, is what a step pays: about 4 ms of a one-sequence decode step of the
// default model. Each kernel here rounds its intermediates to the activations' type wherever the reference
// operators return a tensor of that type, so bf16 and fp16 results match the PyTorch chain's, not just fp32's.
//
// Built with the attention kernel by kernels/native.py and called through ctypes.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "numeric.h"

// Every rounding written here must happen: contracting a product and a sum into one FMA would skip the rounding of
// the product that the reference operators do (visible in fp16, where the compiler computes in half precision).
#pragma GCC optimize("fp-contract=off")

namespace {

using spindle::BFloat16;
using spindle::exp_nonpositive;
using spindle::round_to;
using spindle::store;
using spindle::to_float;

// Below this many elements a kernel runs on the calling thread: sharing it out costs more than it saves (PyTorch's
// own grain size).
constexpr int64_t kParallelElements = 32768;

#if defined(__AVX512BF16__)
using spindle::load_bf16x16;
using spindle::round_bf16x16;
using spindle::store_bf16x16;

// Vectors that silu_and_mul_vectors takes at a time, their exp chains overlapping (see exp_nonpositive).
constexpr int kVectors = 8;

// silu_and_mul's arithmetic (below) for kVectors x 16 bf16 columns: the auto-vectorised loop, with its rounding in
// software and one vector's chain at a time, took 2.7x as long (2048 x 1536, 0.89 against 0.33 ms).
inline void silu_and_mul_vectors(const BFloat16* gate, const BFloat16* up, BFloat16* out) {
    __m512 x[kVectors], e[kVectors];
    for (int v = 0; v < kVectors; ++v) {
        x[v] = load_bf16x16(gate + 16 * v);
        e[v] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x[v]));
    }
    exp_nonpositive(e);
    for (int v = 0; v < kVectors; ++v) {
        const __mmask16 non_negative = _mm512_cmp_ps_mask(x[v], _mm512_setzero_ps(), _CMP_GE_OQ);
        const __m512 numerator = _mm512_mask_blend_ps(non_negative, e[v], _mm512_set1_ps(1.0f));
        const __m512 sigmoid = _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e[v]));
        const __m512 product = _mm512_mul_ps(round_bf16x16(_mm512_mul_ps(x[v], sigmoid)), load_bf16x16(up + 16 * v));
        store_bf16x16(product, out + 16 * v);
    }
}
#endif

// out = weight * round(x / rms(x)), where x = round(input + residual) is also written back to residual when given
// (the residual stream after a sublayer), as HF's LlamaRMSNorm computes it: in fp32, rounded before the weight.
template <typename T>
void rms_norm(const T* input, T* residual, const T* weight, T* out, int64_t rows, int hidden, float eps) {
#pragma omp parallel for if (rows * hidden >= kParallelElements)
    for (int64_t row = 0; row < rows; ++row) {
        const T* in = input + row * hidden;
        T* dst = out + row * hidden;
        const T* source = in;
        // In bf16 with AVX512-BF16, the passes that round go 16 columns at a time through the hardware's rounding
        // (2048 rows of 576 with the residual: 0.18 -> 0.12 ms); the loops after them take what is left.
        if (residual != nullptr) {
            T* res = residual + row * hidden;
            int i = 0;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same_v<T, BFloat16>)
                for (; i + 16 <= hidden; i += 16)
                    store_bf16x16(_mm512_add_ps(load_bf16x16(in + i), load_bf16x16(res + i)), res + i);
#endif
#pragma omp simd
            for (int j = i; j < hidden; ++j) store(to_float(in[j]) + to_float(res[j]), res + j);
            source = res;
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int i = 0; i < hidden; ++i) squares += to_float(source[i]) * to_float(source[i]);
        const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
        int i = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, BFloat16>)
            for (; i + 16 <= hidden; i += 16) {
                const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(source + i), _mm512_set1_ps(inverse)));
                store_bf16x16(_mm512_mul_ps(load_bf16x16(weight + i), normed), dst + i);
            }
#endif
#pragma omp simd
        for (int j = i; j < hidden; ++j) {
            store(to_float(weight[j]) * round_to<T>(to_float(source[j]) * inverse), dst + j);
        }
    }
}


// out[r, i] = round(silu(gate[r, i])) * up[r, i] for gate_up = [gate | up] per row. The sigmoid takes e^-|x|
// (at most 1, where exp_nonpositive applies) rather than libm's expf, which does not vectorise.
template <typename T>
void silu_and_mul(const T* gate_up, T* out, int64_t rows, int width) {
#pragma omp parallel for if (rows * width >= kParallelElements)
    for (int64_t row = 0; row < rows; ++row) {
        const T* gate = gate_up + row * 2 * width;
        const T* up = gate + width;
        T* dst = out + row * width;
        int first = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, BFloat16>)
            for (; first + 16 * kVectors <= width; first += 16 * kVectors)
                silu_and_mul_vectors(gate + first, up + first, dst + first);
#endif
#pragma omp simd
        for (int i = first; i < width; ++i) {
            const float x = to_float(gate[i]);
            const float e = exp_nonpositive(-std::fabs(x));
            const float sigmoid = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
            store(round_to<T>(x * sigmoid) * to_float(up[i]), dst + i);
        }
    }
}

// Rotate-half RoPE of Q and K, which sit side by side at the start of each row of `source` (the fused QKV
// projection's output, row stride `source_stride` elements): q_heads head vectors into `q_out` [rows, q_heads, dim],
// the next k_heads into `k_out` [rows, k_heads, dim]. out = round(x * cos) + round(rotate_half(x) * sin), with
// cos/sin [rows, dim].
template <typename T>
void rotary(const T* source, int64_t source_stride, const T* cos, const T* sin, T* q_out, T* k_out, int64_t rows,
            int q_heads, int k_heads, int dim) {
    const int half = dim / 2;
    const int heads = q_heads + k_heads;
#pragma omp parallel for if (rows * heads * dim >= kParallelElements)
    for (int64_t row = 0; row < rows; ++row) {
        const T* c = cos + row * dim;
        const T* s = sin + row * dim;
        for (int head = 0; head < heads; ++head) {
            const T* x = source + row * source_stride + static_cast<int64_t>(head) * dim;
            T* dst = head < q_heads ? q_out + (row * q_heads + head) * dim
                                    : k_out + (row * k_heads + head - q_heads) * dim;
            int first = 0;  // bf16 on AVX512-BF16: 16 columns at a time (2048 rows of 12 heads: 0.19 -> 0.10 ms)
#if defined(__AVX512BF16__)
            if constexpr (std::is_same_v<T, BFloat16>)
                for (; first + 16 <= half; first += 16) {
                    const __m512 low = load_bf16x16(x + first), high = load_bf16x16(x + first + half);
                    const __m512 negated_high = _mm512_sub_ps(_mm512_setzero_ps(), high);
                    store_bf16x16(_mm512_add_ps(round_bf16x16(_mm512_mul_ps(low, load_bf16x16(c + first))),
                                                round_bf16x16(_mm512_mul_ps(negated_high, load_bf16x16(s + first)))),
                                  dst + first);
                    store_bf16x16(_mm512_add_ps(round_bf16x16(_mm512_mul_ps(high, load_bf16x16(c + first + half))),
                                                round_bf16x16(_mm512_mul_ps(low, load_bf16x16(s + first + half)))),
                                  dst + first + half);
                }
#endif
#pragma omp simd
            for (int i = first; i < half; ++i) {
                const float low = to_float(x[i]), high = to_float(x[i + half]);
                store(round_to<T>(low * to_float(c[i])) + round_to<T>(-high * to_float(s[i])), dst + i);
                store(round_to<T>(high * to_float(c[i + half])) + round_to<T>(low * to_float(s[i + half])),
                      dst + i + half);
            }
        }
    }
}

}  // namespace

#define SPINDLE_LAYER_OPS_ENTRIES(suffix, type)                                                                    \
    extern "C" void spindle_rms_norm_##suffix(const void* input, void* residual, const void* weight, void* out,  \
                                              int64_t rows, int hidden, float eps) {                              \
        rms_norm(static_cast<const type*>(input), static_cast<type*>(residual), static_cast<const type*>(weight), \
                 static_cast<type*>(out), rows, hidden, eps);                                                     \
    }                                                                                                             \
    extern "C" void spindle_silu_and_mul_##suffix(const void* gate_up, void* out, int64_t rows, int width) {     \
        silu_and_mul(static_cast<const type*>(gate_up), static_cast<type*>(out), rows, width);                    \
    }                                                                                                             \
    extern "C" void spindle_rotary_##suffix(const void* source, int64_t source_stride, const void* cos,          \
                                            const void* sin, void* q_out, void* k_out, int64_t rows, int q_heads, \
                                            int k_heads, int dim) {                                               \
        rotary(static_cast<const type*>(source), source_stride, static_cast<const type*>(cos),                    \
               static_cast<const type*>(sin), static_cast<type*>(q_out), static_cast<type*>(k_out), rows, q_heads, \
               k_heads, dim);                                                                                     \
    }

SPINDLE_LAYER_OPS_ENTRIES(f32, float)
SPINDLE_LAYER_OPS_ENTRIES(f16, spindle::Half)
SPINDLE_LAYER_OPS_ENTRIES(bf16, BFloat16)
