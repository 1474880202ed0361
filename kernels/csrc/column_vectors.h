// What the 4-bit and 8-bit linear kernels with fp32 activations share (cpu_linear_f32.cpp, cpu_linear_q8.cpp): blocks
// of 16 output columns as kParts native vectors, groups of 32 input channels, and the fp16 scales stored per block
// and group.
#pragma once

#include <cstdint>
#include <cstring>

#include "native_vector.h"

namespace {

// A block's 16 columns are kParts native vectors.
constexpr int kColumns = 16, kGroup = 32, kParts = kColumns / kLanes;
constexpr int64_t kScaleBytes = 32;  // a block's 16 fp16 scales (or minimums) for one group
// Rows multiplied per pass over a block's weights: their sums stay in registers (16 vector registers on AVX2 and
// NEON's 32 of a quarter the width, 32 on AVX-512).
#if defined(__AVX512F__)
constexpr int kRowChunk = 8;
#else
constexpr int kRowChunk = 4;
#endif

// A block's 16 fp16 values (scales or minimums) widened to fp32.
inline void load_halves(const uint8_t* source, Vec (&out)[kParts]) {
    for (int p = 0; p < kParts; ++p) out[p] = load_lanes(reinterpret_cast<const spindle::Half*>(source) + p * kLanes);
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
