// 4-bit weights times int8-quantized fp32 activations: out[M, N] ~= x[M, K] @ W[N, K]^T, fp32 in and out.
//
// The lossy, faster sibling of cpu_linear_f32.cpp (chosen with activation_quantization int8). Rebuilding each 4-bit
// weight in fp32 costs a conversion and two multiply-adds per weight, which is what bounds an fp32 decode step on CPUs
// without bf16 dot products. Here each row's activations are quantized once per call, per group of 32 channels, to
// int8 with the scale max|x| / 127 (as llama.cpp's Q8_1 does), and the group's dot products are integer: levels (0-15,
// unsigned) times quantized activations (signed), four products summed into each 32-bit lane per instruction where
// the CPU has one (AVX512-VNNI vpdpbusd, NEON sdot), two instructions on AVX2/AVX-512BW (vpmaddubsw, vpmaddwd).
// Per group, with w = level * scale + minimum and x ~= d * q:
//   sum_j w_j x_j ~= scale * d * sum_j level_j q_j + minimum * sum_j x_j
// The minimum's term uses the exact fp32 sum of the activations, so only the levels' term carries the quantization
// error (each activation off by at most d / 2).
//
// The layout, per block of 16 output columns and group of 32 input channels (blocks one after another, each block's
// groups in order), 320 bytes like the fp32 kernel's but ordered for 4-byte lanes: the 16 columns' fp16 scales, their
// fp16 minimums, then 4 steps of 64 bytes: step t holds, for each column c, 4 bytes whose low nibbles are column c's
// levels of channels 4t to 4t + 3 and whose high nibbles those of channels 16 + 4t to 16 + 4t + 3.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "column_vectors.h"

namespace {

typedef uint8_t Bytes __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t Words __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int kSteps = 4;
constexpr int64_t kStepBytes = kColumns * 4;

// Each 32-bit lane of acc plus the sum of its four products levels[4l + k] * activations[4l + k] (unsigned levels
// up to 15, signed activations): exact in every path (the 16-bit pair sums reach at most 2 * 15 * 128).
inline Ints dot4(Ints acc, Bytes levels, Bytes activations) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return reinterpret_cast<Ints>(_mm512_dpbusd_epi32(reinterpret_cast<__m512i>(acc), reinterpret_cast<__m512i>(levels),
                                                      reinterpret_cast<__m512i>(activations)));
#elif defined(__AVX512BW__)
    const __m512i pairs = _mm512_maddubs_epi16(reinterpret_cast<__m512i>(levels), reinterpret_cast<__m512i>(activations));
    return acc + reinterpret_cast<Ints>(_mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#elif defined(__AVX2__)
    const __m256i pairs = _mm256_maddubs_epi16(reinterpret_cast<__m256i>(levels), reinterpret_cast<__m256i>(activations));
    return acc + reinterpret_cast<Ints>(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#elif defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
    return reinterpret_cast<Ints>(vdotq_s32(reinterpret_cast<int32x4_t>(acc), reinterpret_cast<int8x16_t>(levels),
                                            reinterpret_cast<int8x16_t>(activations)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const int8x16_t a = reinterpret_cast<int8x16_t>(levels), b = reinterpret_cast<int8x16_t>(activations);
    const int32x4_t low = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    const int32x4_t high = vpaddlq_s16(vmull_high_s8(a, b));
    return acc + reinterpret_cast<Ints>(vpaddq_s32(low, high));
#else
    for (int lane = 0; lane < kLanes; ++lane)
        for (int k = 0; k < 4; ++k)
            acc[lane] += levels[4 * lane + k] * static_cast<int8_t>(activations[4 * lane + k]);
    return acc;
#endif
}

// One row's activations as the kernel reads them: per group, 32 int8 values, their scale and the fp32 sum of the
// unquantized values.
struct QuantizedRows {
    std::vector<int8_t> values;
    std::vector<float> scales, sums;

    QuantizedRows(const float* x, int64_t rows, int64_t in_features)
        : values(rows * in_features), scales(rows * in_features / kGroup), sums(rows * in_features / kGroup) {
        const int64_t groups = rows * in_features / kGroup;
        for (int64_t g = 0; g < groups; ++g) {
            const float* source = x + g * kGroup;
            float largest = 0.0f, sum = 0.0f;
            for (int j = 0; j < kGroup; ++j) {
                largest = std::max(largest, std::fabs(source[j]));
                sum += source[j];
            }
            const float scale = largest / 127.0f, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int j = 0; j < kGroup; ++j)
                values[g * kGroup + j] = static_cast<int8_t>(std::nearbyint(source[j] * inverse));
            scales[g] = scale;
            sums[g] = sum;
        }
    }
};

// The 4 activation bytes of channels 4 step .. 4 step + 3 (second: 16 channels on) in every lane.
inline Bytes broadcast_quad(const int8_t* group, int step, int second) {
    int32_t quad;
    std::memcpy(&quad, group + 4 * step + second * kGroup / 2, sizeof(quad));
    Ints lanes = {};
    lanes += quad;
    return reinterpret_cast<Bytes>(lanes);
}

// ``Rows`` quantized rows against one block's ``groups`` groups, into ``sums`` [Rows][kParts].
template <int Rows>
inline void block_sums(const QuantizedRows& quantized, int64_t first_row, int64_t in_features, const uint8_t* block,
                       int64_t groups, Vec (*sums)[kParts]) {
    Vec total[Rows][kParts] = {};
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* group = block + g * kInt4GroupBytes;
        Ints dots[Rows][kParts] = {};
        for (int step = 0; step < kSteps; ++step) {
            Bytes low[kParts], high[kParts];
            for (int p = 0; p < kParts; ++p) {
                Bytes packed;
                std::memcpy(&packed, group + 2 * kScaleBytes + step * kStepBytes + p * sizeof(Bytes), sizeof(packed));
                low[p] = packed & 0xF;
                high[p] = reinterpret_cast<Bytes>(reinterpret_cast<Words>(packed) >> 4) & 0xF;
            }
            for (int r = 0; r < Rows; ++r) {
                const int8_t* activations = quantized.values.data() + (first_row + r) * in_features + g * kGroup;
                const Bytes first = broadcast_quad(activations, step, 0), second = broadcast_quad(activations, step, 1);
                for (int p = 0; p < kParts; ++p) dots[r][p] = dot4(dot4(dots[r][p], low[p], first), high[p], second);
            }
        }
        Vec scale[kParts], minimum[kParts];
        load_halves(group, scale);
        load_halves(group + kScaleBytes, minimum);
        for (int r = 0; r < Rows; ++r) {
            const int64_t index = ((first_row + r) * in_features) / kGroup + g;
            const float d = quantized.scales[index], sum = quantized.sums[index];
            for (int p = 0; p < kParts; ++p)
                total[r][p] += __builtin_convertvector(dots[r][p], Vec) * (scale[p] * d) + minimum[p] * sum;
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int p = 0; p < kParts; ++p) sums[r][p] = total[r][p];
}

inline void block_rows(int count, const QuantizedRows& quantized, int64_t first_row, int64_t in_features,
                       const uint8_t* block, int64_t groups, Vec (*sums)[kParts]) {
    switch (count) {
        case 1: block_sums<1>(quantized, first_row, in_features, block, groups, sums); break;
        case 2: block_sums<2>(quantized, first_row, in_features, block, groups, sums); break;
        case 3: block_sums<3>(quantized, first_row, in_features, block, groups, sums); break;
#if defined(__AVX512F__)
        case 4: block_sums<4>(quantized, first_row, in_features, block, groups, sums); break;
        case 5: block_sums<5>(quantized, first_row, in_features, block, groups, sums); break;
        case 6: block_sums<6>(quantized, first_row, in_features, block, groups, sums); break;
        case 7: block_sums<7>(quantized, first_row, in_features, block, groups, sums); break;
#endif
        default: block_sums<kRowChunk>(quantized, first_row, in_features, block, groups, sums); break;
    }
}

}  // namespace

// Levels [N, K] (one per byte, 0-15) with fp16 scales and minimums [N, K / 32] into the layout above.
extern "C" void spindle_pack_int4_q8(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums,
                                     uint8_t* packed, int64_t out_features, int64_t in_features) {
    pack_int4_groups(levels, scales, minimums, packed, out_features, in_features, [](int column, int channel) {
        return channel / 4 * kStepBytes + 4 * column + channel % 4;
    });
}

// out [M, N] ~= x [M, K] @ W^T for W packed by spindle_pack_int4_q8 (N a multiple of 16, K of 32).
extern "C" bool spindle_linear_int4_q8(const float* x, const uint8_t* packed, float* out, int64_t rows,
                                       int64_t out_features, int64_t in_features, int threads) {
    const QuantizedRows quantized(x, rows, in_features);
    const int64_t groups = in_features / kGroup, blocks = out_features / kColumns;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = packed + b * groups * kInt4GroupBytes;
        for (int64_t first = 0; first < rows; first += kRowChunk) {
            const int count = static_cast<int>(std::min<int64_t>(kRowChunk, rows - first));
            Vec sums[kRowChunk][kParts];
            block_rows(count, quantized, first, in_features, block, groups, sums);
            for (int r = 0; r < count; ++r)
                std::memcpy(out + (first + r) * out_features + b * kColumns, sums[r], sizeof(sums[r]));
        }
    }
    return true;
}
