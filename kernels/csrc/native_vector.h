// The native fp32 vector of the CPU the library is built for, and what kernels do with it whatever its width: load
// fp32 / fp16 / bf16 elements as fp32 lanes, and sum the lanes of many vectors at once.
//
// Kernels are written against Vec (kLanes wide) rather than a fixed 16-lane type: GCC lowers a vector wider than
// the CPU's registers element by element wherever lanes move between registers (shuffles, conversions), which made
// a 16-lane decode attention 3.6x slower on AVX2 than on AVX-512 instead of about 2x.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "numeric.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

// 16 fp32 lanes on AVX-512, 8 on AVX2, 4 elsewhere (NEON, SSE2).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t Bits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Bits32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes consecutive elements as fp32.
inline Vec load_lanes(const float* source) {
    Vec v;
    std::memcpy(&v, source, sizeof(v));
    return v;
}
inline Vec load_lanes(const spindle::BFloat16* source) {
    Bits16 bits;
    std::memcpy(&bits, source, sizeof(bits));
    return reinterpret_cast<Vec>(__builtin_convertvector(bits, Bits32) << 16);
}
// (GCC's generic conversion of a vector of halves goes element by element: use the CPU's own where it has one.)
inline Vec load_lanes(const spindle::Half* source) {
#if defined(__AVX512F__)
    return reinterpret_cast<Vec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source))));
#elif defined(__AVX2__) && defined(__F16C__)
    return reinterpret_cast<Vec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return reinterpret_cast<Vec>(vcvt_f32_f16(vld1_f16(reinterpret_cast<const __fp16*>(source))));
#else
    Vec v;
    for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(source[i]);
    return v;
#endif
}

// The lane sums of kLanes vectors in one, by a tree of shuffles and adds (about a third of the instructions of
// kLanes separate horizontal sums): lane i of the result is the sum of the lanes of v[lane_slot(i)]. Callers put
// source i at v[lane_slot(i)] (a bit reversal) to read its sum from lane i.
constexpr int lane_slot(int i) {
    int reversed = 0;
    for (int bit = 1; bit < kLanes; bit <<= 1) reversed = reversed << 1 | ((i & bit) ? 1 : 0);
    return reversed;
}

// Where lane `lane` of one fold step reads from (a, b concatenated): within each block of 2 * Span lanes, the first
// Span take a's block folded in half, the last Span b's.
constexpr int fold_source(int span, int lane, bool upper) {
    const int block = lane / (2 * span), within = lane % (2 * span);
    return block * 2 * span + (upper ? span : 0) + within % span + (within < span ? 0 : kLanes);
}

template <int Span, int... Lane>
inline Vec fold(Vec a, Vec b, std::integer_sequence<int, Lane...>) {
    return __builtin_shufflevector(a, b, fold_source(Span, Lane, false)...) +
           __builtin_shufflevector(a, b, fold_source(Span, Lane, true)...);
}

template <int Span>
inline void fold_pairs(Vec* v) {
    for (int i = 0; i < Span; ++i) v[i] = fold<Span>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, kLanes>());
    if constexpr (Span > 1) fold_pairs<Span / 2>(v);
}

inline Vec sum_lanes(const Vec* v) {
    Vec work[kLanes];
    std::memcpy(work, v, sizeof(work));
    fold_pairs<kLanes / 2>(work);
    return work[0];
}

}  // namespace
