// What the 4-bit and 8-bit linear kernels with fp32 activations share (cpu_linear_f32.cpp, cpu_linear_q8.cpp): the
// native fp32 vector, blocks of 16 output columns as kParts of them, groups of 32 input channels, and the fp16 scales
// stored per block and group.
#pragma once

#include <cstdint>
#include <cstring>

#include "numeric.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

// The native vector: 16 fp32 lanes on AVX-512, 8 on AVX2, 4 elsewhere (NEON, SSE2); a block's 16 columns are
// kParts of them.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int kColumns = 16, kGroup = 32, kParts = kColumns / kLanes;
constexpr int64_t kScaleBytes = 32;  // a block's 16 fp16 scales (or minimums) for one group
// Rows multiplied per pass over a block's weights: their sums stay in registers (16 vector registers on AVX2 and
// NEON's 32 of a quarter the width, 32 on AVX-512).
#if defined(__AVX512F__)
constexpr int kRowChunk = 8;
#else
constexpr int kRowChunk = 4;
#endif

// 16 fp16 values widened to fp32. (GCC's generic conversion of a vector of halves goes element by element.)
inline void load_halves(const uint8_t* source, Vec (&out)[kParts]) {
#if defined(__AVX512F__)
    out[0] = reinterpret_cast<Vec>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source))));
#elif defined(__AVX2__) && defined(__F16C__)
    for (int p = 0; p < kParts; ++p)
        out[p] = reinterpret_cast<Vec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source) + p)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (int p = 0; p < kParts; ++p)
        out[p] = reinterpret_cast<Vec>(vcvt_f32_f16(vld1_f16(reinterpret_cast<const __fp16*>(source) + 4 * p)));
#else
    spindle::Half halves[kColumns];
    std::memcpy(halves, source, sizeof(halves));
    for (int i = 0; i < kColumns; ++i) out[i / kLanes][i % kLanes] = static_cast<float>(halves[i]);
#endif
}

// The fp16 scale (and minimum) of each column of a block for one group, from [N, K / 32] tables.
void pack_scales(const uint16_t* table, int64_t block, int64_t group, int64_t groups, uint8_t* target) {
    auto* fp16 = reinterpret_cast<uint16_t*>(target);
    for (int c = 0; c < kColumns; ++c) fp16[c] = table[(block * kColumns + c) * groups + group];
}

// The 4-bit layouts' frame, per block of 16 output columns and group of 32 input channels (blocks one after another,
// each block's groups in order), 320 bytes: the 16 columns' fp16 scales, their fp16 minimums, then 256 bytes of
// levels, a byte per column and channel c < 16 holding the level of channel c (low nibble) and c + 16 (high nibble).
// ``slot(column, channel)`` says where in those 256 bytes each kernel wants that byte.
constexpr int64_t kInt4GroupBytes = 320;

template <typename Slot>
void pack_int4_groups(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums, uint8_t* packed,
                      int64_t out_features, int64_t in_features, Slot slot) {
    const int64_t groups = in_features / kGroup;
    for (int64_t b = 0; b < out_features / kColumns; ++b)
        for (int64_t g = 0; g < groups; ++g) {
            uint8_t* target = packed + (b * groups + g) * kInt4GroupBytes;
            pack_scales(scales, b, g, groups, target);
            pack_scales(minimums, b, g, groups, target + kScaleBytes);
            for (int c = 0; c < kColumns; ++c) {
                const uint8_t* column = levels + (b * kColumns + c) * in_features + g * kGroup;
                for (int channel = 0; channel < kGroup / 2; ++channel)
                    target[2 * kScaleBytes + slot(c, channel)] =
                        static_cast<uint8_t>((column[channel] & 0xF) | (column[channel + kGroup / 2] & 0xF) << 4);
            }
        }
}

}  // namespace
