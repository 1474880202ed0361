// 4- and 8-bit weights with fp32 activations, on any CPU: out[M, N] = x[M, K] @ W[N, K]^T, all fp32 arithmetic.
//
// On CPUs without bf16 dot products (AVX2, AVX-512 without BF16, ARM), Spindle computes in fp32, and a decode step's
// time is the bytes of its weights: fp32 copies are 8x the 4-bit ones. Written with GCC's generic vectors, so one
// source compiles to AVX-512 (one register per vector), AVX2 (two), NEON or SSE2 (four), whatever -march says.
//
// Each weight is rebuilt exactly as a GGUF reader dequantizes it: level * scale + minimum (Q4_1) or value * scale
// (Q8_0), fp16 scales widened to fp32. A level (4 bits) or value (8 bits) times an fp16 scale (11 significant bits)
// is exact in fp32, so computing it fused with the addition rounds once, as the reference's separate multiply and add
// do: the kernel multiplies by the very weights an fp32 reference model holds, and only the order of the sums
// differs.
//
// The layouts, per block of 16 output columns and group of 32 input channels (blocks one after another, each block's
// groups in order, so a thread streams its blocks front to back):
// - 4-bit, 320 bytes: the 16 columns' fp16 scales, their fp16 minimums, then 16 rows of 16 bytes: row j's byte c
//   holds column c's level of channel j (low nibble) and of channel j + 16 (high nibble).
// - 8-bit, 544 bytes: the 16 columns' fp16 scales, then 32 rows of 16 signed bytes: row j's byte c is column c's
//   value of channel j.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "column_vectors.h"
#include "numeric.h"

// The accumulations below are written as multiply-adds; let the compiler fuse them (see above for why the
// dequantization's fused rounding is exact).
#pragma GCC optimize("fp-contract=fast")

namespace {

constexpr int64_t kInt8GroupBytes = 544;

// 16 bytes widened to int32, unsigned or signed.
template <bool Signed>
inline void load_bytes(const uint8_t* source, Ints (&out)[kParts]) {
#if defined(__AVX512F__)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
    out[0] = reinterpret_cast<Ints>(Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
    for (int p = 0; p < kParts; ++p) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(source + 8 * p));
        out[p] = reinterpret_cast<Ints>(Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const uint8x16_t bytes = vld1q_u8(source);
    const int16x8_t halves[2] = {
        Signed ? vmovl_s8(vget_low_s8(vreinterpretq_s8_u8(bytes))) : vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(bytes))),
        Signed ? vmovl_high_s8(vreinterpretq_s8_u8(bytes)) : vreinterpretq_s16_u16(vmovl_high_u8(bytes))};
    for (int p = 0; p < kParts; ++p) {
        const int16x8_t half = halves[p / 2];
        out[p] = reinterpret_cast<Ints>(p % 2 ? vmovl_high_s16(half) : vmovl_s16(vget_low_s16(half)));
    }
#else
    for (int i = 0; i < kColumns; ++i)
        out[i / kLanes][i % kLanes] = Signed ? static_cast<int8_t>(source[i]) : source[i];
#endif
}

// A group of the 4-bit layout: each of its 16 steps gives the 16 columns' weights of channels step and step + 16.
struct Int4Group {
    static constexpr int64_t kBytes = kInt4GroupBytes;
    Vec scale[kParts], minimum[kParts];
    const uint8_t* levels;

    explicit Int4Group(const uint8_t* group) : levels(group + 2 * kScaleBytes) {
        load_halves(group, scale);
        load_halves(group + kScaleBytes, minimum);
    }
    static constexpr int channel(int step, int second) { return step + second * kGroup / 2; }
    void weights(int step, Vec (&first)[kParts], Vec (&second)[kParts]) const {
        Ints packed[kParts];
        load_bytes<false>(levels + step * kColumns, packed);
        for (int p = 0; p < kParts; ++p) {
            first[p] = __builtin_convertvector(packed[p] & 0xF, Vec) * scale[p] + minimum[p];
            second[p] = __builtin_convertvector(packed[p] >> 4, Vec) * scale[p] + minimum[p];
        }
    }
};

// A group of the 8-bit layout: each of its 16 steps gives the weights of channels 2 step and 2 step + 1.
struct Int8Group {
    static constexpr int64_t kBytes = kInt8GroupBytes;
    Vec scale[kParts];
    const uint8_t* values;

    explicit Int8Group(const uint8_t* group) : values(group + kScaleBytes) { load_halves(group, scale); }
    static constexpr int channel(int step, int second) { return 2 * step + second; }
    void weights(int step, Vec (&first)[kParts], Vec (&second)[kParts]) const {
        Ints a[kParts], b[kParts];
        load_bytes<true>(values + 2 * step * kColumns, a);
        load_bytes<true>(values + (2 * step + 1) * kColumns, b);
        for (int p = 0; p < kParts; ++p) {
            first[p] = __builtin_convertvector(a[p], Vec) * scale[p];
            second[p] = __builtin_convertvector(b[p], Vec) * scale[p];
        }
    }
};

// ``Rows`` rows of x (row stride ``in_features``) against one block's ``groups`` groups, into ``sums``
// [Rows][kParts]. One row keeps two sets of sums (each step's first and second channel) to halve its chain of
// dependent additions; more rows are independent chains already.
template <typename Group, int Rows>
inline void block_sums(const float* x, int64_t in_features, const uint8_t* block, int64_t groups,
                       Vec (*sums)[kParts]) {
    constexpr int kChains = Rows == 1 ? 2 : 1;
    Vec acc[Rows][kChains][kParts] = {};
    for (int64_t g = 0; g < groups; ++g) {
        const Group group(block + g * Group::kBytes);
        const float* xg = x + g * kGroup;
        for (int step = 0; step < kGroup / 2; ++step) {
            Vec first[kParts], second[kParts];
            group.weights(step, first, second);
            for (int p = 0; p < kParts; ++p)
                for (int r = 0; r < Rows; ++r) {
                    acc[r][0][p] += xg[r * in_features + Group::channel(step, 0)] * first[p];
                    acc[r][kChains - 1][p] += xg[r * in_features + Group::channel(step, 1)] * second[p];
                }
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < kParts; ++p)
            sums[r][p] = kChains == 1 ? acc[r][0][p] : acc[r][0][p] + acc[r][kChains - 1][p];
}

// block_sums over ``count`` rows (1 to kRowChunk): one instantiation per row count.
template <typename Group>
inline void block_rows(int count, const float* x, int64_t in_features, const uint8_t* block, int64_t groups,
                       Vec (*sums)[kParts]) {
    switch (count) {
        case 1: block_sums<Group, 1>(x, in_features, block, groups, sums); break;
        case 2: block_sums<Group, 2>(x, in_features, block, groups, sums); break;
        case 3: block_sums<Group, 3>(x, in_features, block, groups, sums); break;
#if defined(__AVX512F__)
        case 4: block_sums<Group, 4>(x, in_features, block, groups, sums); break;
        case 5: block_sums<Group, 5>(x, in_features, block, groups, sums); break;
        case 6: block_sums<Group, 6>(x, in_features, block, groups, sums); break;
        case 7: block_sums<Group, 7>(x, in_features, block, groups, sums); break;
#endif
        default: block_sums<Group, kRowChunk>(x, in_features, block, groups, sums); break;
    }
}

template <typename Group>
void linear(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
            int64_t in_features, int threads) {
    const int64_t groups = in_features / kGroup, blocks = out_features / kColumns;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = packed + b * groups * Group::kBytes;
        for (int64_t first = 0; first < rows; first += kRowChunk) {
            const int count = static_cast<int>(std::min<int64_t>(kRowChunk, rows - first));
            Vec sums[kRowChunk][kParts];
            block_rows<Group>(count, x + first * in_features, in_features, block, groups, sums);
            for (int r = 0; r < count; ++r)
                std::memcpy(out + (first + r) * out_features + b * kColumns, sums[r], sizeof(sums[r]));
        }
    }
}
}  // namespace

// Levels [N, K] (one per byte, 0-15) with fp16 scales and minimums [N, K / 32] into the 4-bit layout above.
extern "C" void spindle_pack_int4_f32(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums,
                                      uint8_t* packed, int64_t out_features, int64_t in_features) {
    pack_int4_groups(levels, scales, minimums, packed, out_features, in_features,
                     [](int column, int channel) { return channel * kColumns + column; });
}

// Values [N, K] (int8) with fp16 scales [N, K / 32] into the 8-bit layout above.
extern "C" void spindle_pack_int8_f32(const int8_t* values, const uint16_t* scales, uint8_t* packed,
                                      int64_t out_features, int64_t in_features) {
    const int64_t groups = in_features / kGroup;
    for (int64_t b = 0; b < out_features / kColumns; ++b)
        for (int64_t g = 0; g < groups; ++g) {
            uint8_t* target = packed + (b * groups + g) * kInt8GroupBytes;
            pack_scales(scales, b, g, groups, target);
            for (int j = 0; j < kGroup; ++j)
                for (int c = 0; c < kColumns; ++c)
                    target[kScaleBytes + j * kColumns + c] =
                        static_cast<uint8_t>(values[(b * kColumns + c) * in_features + g * kGroup + j]);
        }
}

// out [M, N] = x [M, K] @ W^T for W packed by spindle_pack_int4_f32 (N a multiple of 16, K of 32).
extern "C" bool spindle_linear_int4_f32(const float* x, const uint8_t* packed, float* out, int64_t rows,
                                        int64_t out_features, int64_t in_features, int threads) {
    linear<Int4Group>(x, packed, out, rows, out_features, in_features, threads);
    return true;
}

// out [M, N] = x [M, K] @ W^T for W packed by spindle_pack_int8_f32.
extern "C" bool spindle_linear_int8_f32(const float* x, const uint8_t* packed, float* out, int64_t rows,
                                        int64_t out_features, int64_t in_features, int threads) {
    linear<Int8Group>(x, packed, out, rows, out_features, in_features, threads);
    return true;
}
