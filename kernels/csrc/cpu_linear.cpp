// Linear layers on AMX tiles: out[M, N] = x[M, K] @ W[N, K]^T, bf16 activations, fp32 accumulation, bf16 out.
//
// bf16 weights: a decode step of a few dozen rows is bound by reading the weights, and oneDNN's matmul, called from
// PyTorch, read them at about half the rate this machine streams memory at. This kernel keeps each weight in the
// tiles' own layout (packed once, at load), walks it once per call in order while prefetching ahead, and reuses
// every weight tile for 32 rows: within a few percent of the memory bandwidth up to 32 rows, and ahead of oneDNN at
// every row count measured.
//
// 4-bit weights (levels with an fp16 scale and minimum per 32 input channels, GGUF Q4_1's form): a quarter of the
// bytes, for small steps. The tiles multiply x by the levels themselves (exact in bf16) and the vector
// units apply each group's scale and minimum to the fp32 products, so no weight is rounded. On a CPU with
// AVX512-BF16 but no AMX, vdpbf16ps does the tiles' part from the same layout: PyTorch's 4-bit kernel took 1.2x
// as long there at 1 row, 1.8x at 16 (weights read from memory, prefetched as on the tiles).
//
// Compiled to nothing but ``spindle_amx_enable`` returning false where the compiler does not target AMX-BF16
// (-march=native on a CPU without it, see amx.h); Linux also has to grant the process the tile state, which the same
// call asks for.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "numeric.h"

namespace {

// A weight tile holds 32 input channels (as 16 rows of pairs) of 16 output channels: 512 bf16. Each 32-channel
// output block stores its two tiles per 32 input channels next to each other, blocks one after another.
constexpr int kTileRows = 16;
constexpr int64_t kTileDepth = 32, kBlockColumns = 32, kTileElements = 512;

// The 4-bit layout, per 32-column block and 32 input channels (one quantization group): the 32 columns' scales,
// then their minimums (fp16 each), then the levels of the block's two weight tiles, each as 8 pairs of tile rows:
// 32 bytes whose byte i holds lane i's level in the first row (low nibble) and in the second (high nibble). A lane
// is a (column, channel) pair as in the bf16 tiles. 640 bytes where bf16 takes 2048.
constexpr int64_t kInt4StepBytes = 640, kInt4ScaleBytes = 64, kInt4TileBytes = 256;

// The 8-bit layout (GGUF Q8_0's form: w = scale * value, values -127 to 127, an fp16 scale per 32 input channels),
// per 32-column block and group: the 32 columns' scales, then the block's two tiles, each 16 tile rows of 32 signed
// bytes (lane i as in the bf16 tiles). 1088 bytes where bf16 takes 2048.
constexpr int64_t kInt8StepBytes = 1088, kInt8ScaleBytes = 64;

#if defined(__AVX512BF16__)
#include <immintrin.h>

// Far enough ahead of the weights being read for the load to arrive in time, near enough to stay in L1: 4 steps of
// K in bf16, 12 in the 4-bit layout.
constexpr int64_t kPrefetchBytes = 8192;

// Asks for the group of ``step_bytes`` kPrefetchBytes ahead of ``group``.
inline void prefetch_group(const uint8_t* group, int64_t step_bytes) {
    for (int64_t line = 0; line < step_bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(group) + kPrefetchBytes + line, _MM_HINT_T0);
}

// The levels of one group (two tiles) as exact bf16 integers 0-15, in the bf16 tile layout: each byte's two nibbles
// go to bf16 lanes of consecutive tile rows through a 16-entry table (vpermw).
void unpack_levels(const uint8_t* levels, uint16_t* tiles) {
    static const __m512i table = [] {
        alignas(64) uint16_t bits[32] = {};
        for (int level = 0; level < 16; ++level) {
            const float value = static_cast<float>(level);
            uint32_t word;
            std::memcpy(&word, &value, sizeof(word));
            bits[level] = static_cast<uint16_t>(word >> 16);  // small integers are exact in bf16
        }
        return _mm512_load_si512(bits);
    }();
    const __m512i nibble = _mm512_set1_epi16(0xF);
    for (int pair = 0; pair < 16; ++pair) {  // 8 pairs of rows in each of the two tiles
        const __m512i bytes =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(levels + pair * 32)));
        _mm512_store_si512(tiles + pair * 64, _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), table));
        _mm512_store_si512(tiles + pair * 64 + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
    }
}

// One group's fp16 scales and minimums (each of the block's 32 columns') in fp32, by column half; a layout without
// minimums has zeros.
struct GroupScales {
    __m512 scale[2], minimum[2];

    GroupScales(const uint8_t* group, bool has_minimums) {
        const auto* halves = reinterpret_cast<const __m256i*>(group);
        for (int half = 0; half < 2; ++half) {
            scale[half] = _mm512_cvtph_ps(_mm256_loadu_si256(halves + half));
            minimum[half] = has_minimums ? _mm512_cvtph_ps(_mm256_loadu_si256(halves + 2 + half)) : _mm512_setzero_ps();
        }
    }

    // total + scale * (x . levels) + minimum * (the row's sum of x over the group), for one column half.
    __m512 add(int half, __m512 product, __m512 row_sum, __m512 total) const {
        return _mm512_fmadd_ps(row_sum, minimum[half], _mm512_fmadd_ps(product, scale[half], total));
    }
};

// Each row's sum of x over each group of 32 input channels: [rows][in_features / 32]. A register holds a group as
// 16 pairs of bf16; each pair's low element shifted up and its high element masked are those elements in fp32.
// (Vectorised: the scalar loop, serial before the parallel part, took 26 of the 332 us of a layer's projections at
// 32 rows.)
std::vector<float> group_sums(const uint16_t* x, int64_t rows, int64_t in_features) {
    const int64_t k_steps = in_features / kTileDepth;
    const __m512i high_halves = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    std::vector<float> sums(rows * k_steps);
    for (int64_t row = 0; row < rows; ++row)
        for (int64_t step = 0; step < k_steps; ++step) {
            const __m512i pairs = _mm512_loadu_si512(x + row * in_features + step * kTileDepth);
            const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves));
            sums[row * k_steps + step] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
        }
    return sums;
}

// The 8-bit values of one group (two tiles) as exact bf16 integers, in the bf16 tile layout.
void unpack_values(const uint8_t* values, uint16_t* tiles) {
    for (int row = 0; row < 32; ++row) {  // 16 tile rows in each of the two tiles
        const auto* bytes = reinterpret_cast<const __m128i*>(values + row * 32);
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1)));
        _mm512_store_si512(tiles + row * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low)));
    }
}

// The two layouts the vector kernel reads: where a group's levels are, and whether it has minimums.
struct Int4Layout {
    static constexpr int64_t kStepBytes = kInt4StepBytes;
    static constexpr bool kHasMinimums = true;
    static void unpack(const uint8_t* group, uint16_t* tiles) { unpack_levels(group + 2 * kInt4ScaleBytes, tiles); }
};
struct Int8Layout {
    static constexpr int64_t kStepBytes = kInt8StepBytes;
    static constexpr bool kHasMinimums = false;
    static void unpack(const uint8_t* group, uint16_t* tiles) { unpack_values(group + kInt8ScaleBytes, tiles); }
};

// The 4- and 8-bit layouts on the vector units (AVX512-BF16, no tiles): each unpacked tile row is one register of
// 16 columns x 2 channels, which vdpbf16ps multiplies by a broadcast pair of x's channels, exactly as the tiles
// would. Per group, row and column half: four independent sums over the group's 16 channel pairs, then the group's
// scale (and minimum) as in the AMX kernel. The levels are unpacked once per group for every 16 rows of the step.
template <typename Layout>
void linear_vector(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows, int64_t out_features,
                   int64_t in_features, int threads) {
    constexpr int kSums = 4;
    const int64_t k_steps = in_features / kTileDepth, blocks = out_features / kBlockColumns;
    const std::vector<float> sums = Layout::kHasMinimums ? group_sums(x, rows, in_features) : std::vector<float>();
#pragma omp parallel num_threads(threads)
    {
        alignas(64) uint16_t tiles[2 * kTileElements];
        __m512 totals[kTileRows][2];
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const uint8_t* weights = packed + block * k_steps * Layout::kStepBytes;
            for (int64_t first = 0; first < rows; first += kTileRows) {
                const int count = static_cast<int>(std::min<int64_t>(rows - first, kTileRows));
                for (int row = 0; row < count; ++row) totals[row][0] = totals[row][1] = _mm512_setzero_ps();
                for (int64_t step = 0; step < k_steps; ++step) {
                    const uint8_t* group = weights + step * Layout::kStepBytes;
                    if (first == 0) prefetch_group(group, Layout::kStepBytes);  // later row chunks find it in cache
                    Layout::unpack(group, tiles);
                    const GroupScales scales(group, Layout::kHasMinimums);
                    for (int row = 0; row < count; ++row) {
                        const uint16_t* x_group = x + (first + row) * in_features + step * kTileDepth;
                        __m512 acc[2][kSums];
                        for (int half = 0; half < 2; ++half)
                            for (int i = 0; i < kSums; ++i) acc[half][i] = _mm512_setzero_ps();
                        for (int pair = 0; pair < 16; ++pair) {
                            int32_t channels;
                            std::memcpy(&channels, x_group + 2 * pair, 4);
                            const __m512bh broadcast = reinterpret_cast<__m512bh>(_mm512_set1_epi32(channels));
                            for (int half = 0; half < 2; ++half) {
                                const __m512i levels = _mm512_load_si512(tiles + half * kTileElements + pair * 32);
                                acc[half][pair % kSums] = _mm512_dpbf16_ps(acc[half][pair % kSums], broadcast,
                                                                           reinterpret_cast<__m512bh>(levels));
                            }
                        }
                        const __m512 row_sum =
                            Layout::kHasMinimums ? _mm512_set1_ps(sums[(first + row) * k_steps + step]) : _mm512_setzero_ps();
                        for (int half = 0; half < 2; ++half) {
                            const __m512 product = _mm512_add_ps(_mm512_add_ps(acc[half][0], acc[half][1]),
                                                                 _mm512_add_ps(acc[half][2], acc[half][3]));
                            totals[row][half] = scales.add(half, product, row_sum, totals[row][half]);
                        }
                    }
                }
                for (int row = 0; row < count; ++row) {
                    const __m512bh rounded = _mm512_cvtne2ps_pbh(totals[row][1], totals[row][0]);
                    _mm512_storeu_si512(out + (first + row) * out_features + block * kBlockColumns,
                                        reinterpret_cast<__m512i>(rounded));
                }
            }
        }
    }
}
#endif

#ifdef SPINDLE_HAS_AMX

// Tiles 0-3 accumulate C for (row half, column half); 4 and 5 hold the rows of x; 6 and 7 the two weight tiles.
void configure(int first_rows, int second_rows) {
    spindle::TileConfig config;
    const int rows[8] = {first_rows, first_rows, second_rows, second_rows, first_rows, second_rows, kTileRows,
                         kTileRows};
    for (int tile = 0; tile < 8; ++tile) config.set(tile, rows[tile], 64);
    _tile_loadconfig(&config);
}

// C for rows [row, row + first + second) of one 32-column block, both halves of 16 rows at most.
void multiply_block(const uint16_t* x, const uint16_t* weights, int64_t k_steps, int64_t in_features, bool second,
                    bool prefetch) {
    _tile_zero(0);
    _tile_zero(1);
    if (second) {
        _tile_zero(2);
        _tile_zero(3);
    }
    const int64_t stride = in_features * 2;
    for (int64_t step = 0; step < k_steps; ++step) {
        const uint16_t* tiles = weights + step * 2 * kTileElements;
        if (prefetch) {
            const char* ahead = reinterpret_cast<const char*>(tiles) + kPrefetchBytes;
            for (int line = 0; line < 2 * kTileElements * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        }
        _tile_loadd(6, tiles, 64);
        _tile_loadd(7, tiles + kTileElements, 64);
        _tile_loadd(4, x + step * kTileDepth, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (second) {
            _tile_loadd(5, x + kTileRows * in_features + step * kTileDepth, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
}

// C (fp32 [32][32]) rounded to nearest even into ``rows`` rows of ``out`` (row stride ``out_features``).
void store_block(float (*c)[kBlockColumns], int rows, uint16_t* out, int64_t out_features) {
    for (int row = 0; row < rows; ++row) {
        const __m512bh rounded = _mm512_cvtne2ps_pbh(_mm512_load_ps(&c[row][16]), _mm512_load_ps(&c[row][0]));
        _mm512_storeu_si512(out + row * out_features, reinterpret_cast<__m512i>(rounded));
    }
}

// One group's product of (at most 16) rows of x with the levels of a 32-column block, into ``products`` [rows][32]:
// tiles C0 and C1 (the block's halves) and A; the weight tiles are 6 and 7. Alternating C and A between
// consecutive groups lets one group's product overlap the next's. (A macro: the intrinsics take tile numbers as
// literals.)
#define SPINDLE_GROUP_PRODUCT(name, C0, C1, A)                                             \
    void name(const uint16_t* x, int64_t stride, const uint16_t* tiles, float* products) { \
        _tile_zero(C0);                                                                     \
        _tile_zero(C1);                                                                     \
        _tile_loadd(A, x, stride);                                                          \
        _tile_loadd(6, tiles, 64);                                                          \
        _tile_loadd(7, tiles + kTileElements, 64);                                          \
        _tile_dpbf16ps(C0, A, 6);                                                           \
        _tile_dpbf16ps(C1, A, 7);                                                           \
        _tile_stored(C0, products, kBlockColumns * sizeof(float));                          \
        _tile_stored(C1, products + 16, kBlockColumns * sizeof(float));                     \
    }
SPINDLE_GROUP_PRODUCT(even_group_product, 0, 1, 4)
SPINDLE_GROUP_PRODUCT(odd_group_product, 2, 3, 5)
#undef SPINDLE_GROUP_PRODUCT

// Adds one group's scaled product to the rows' totals: total += scale * product + minimum * (the row's sum of x).
void scale_group(const uint8_t* group, const float* products, const float* row_sums, int64_t sum_stride, int count,
                 __m512 (*totals)[2]) {
    const GroupScales scales(group, true);
    for (int row = 0; row < count; ++row) {
        const __m512 row_sum = _mm512_set1_ps(row_sums[row * sum_stride]);
        for (int half = 0; half < 2; ++half) {
            const __m512 product = _mm512_load_ps(products + row * kBlockColumns + 16 * half);
            totals[row][half] = scales.add(half, product, row_sum, totals[row][half]);
        }
    }
}

// out = x @ W^T for 4-bit W, 16 rows of x at a time: per group, the AMX tiles multiply x by the levels themselves
// (exact in bf16), and the group's scale and minimum are applied to that fp32 dot product:
// sum_g scale * (x . levels) + minimum * sum(x over g). No weight is ever rounded to bf16. Software-pipelined: the
// vector units scale group g - 1 while the tiles multiply group g.
void linear_int4(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows, int64_t out_features,
                 int64_t in_features, int threads) {
    const int64_t k_steps = in_features / kTileDepth, blocks = out_features / kBlockColumns;
    const std::vector<float> sums = group_sums(x, rows, in_features);
    const int64_t stride = in_features * sizeof(uint16_t);
#pragma omp parallel num_threads(threads)
    {
        alignas(64) uint16_t tiles[2][2 * kTileElements];         // the levels as bf16, by group parity
        alignas(64) float products[2][kTileRows * kBlockColumns];  // the groups' products, by parity
        __m512 totals[kTileRows][2];
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const uint8_t* weights = packed + block * k_steps * kInt4StepBytes;
            for (int64_t first = 0; first < rows; first += kTileRows) {
                const int count = static_cast<int>(std::min<int64_t>(rows - first, kTileRows));
                if (count != configured) {
                    configure(count, count);
                    configured = count;
                }
                for (int row = 0; row < count; ++row) totals[row][0] = totals[row][1] = _mm512_setzero_ps();
                const uint16_t* x_rows = x + first * in_features;
                const float* row_sums = sums.data() + first * k_steps;
                for (int64_t step = 0; step < k_steps; ++step) {
                    const uint8_t* group = weights + step * kInt4StepBytes;
                    if (first == 0) prefetch_group(group, kInt4StepBytes);
                    const int parity = static_cast<int>(step % 2);
                    unpack_levels(group + 2 * kInt4ScaleBytes, tiles[parity]);
                    if (parity)
                        odd_group_product(x_rows + step * kTileDepth, stride, tiles[1], products[1]);
                    else
                        even_group_product(x_rows + step * kTileDepth, stride, tiles[0], products[0]);
                    if (step > 0)
                        scale_group(group - kInt4StepBytes, products[1 - parity], row_sums + step - 1, k_steps, count,
                                    totals);
                }
                scale_group(weights + (k_steps - 1) * kInt4StepBytes, products[(k_steps - 1) % 2],
                            row_sums + k_steps - 1, k_steps, count, totals);
                for (int row = 0; row < count; ++row) {
                    const __m512bh rounded = _mm512_cvtne2ps_pbh(totals[row][1], totals[row][0]);
                    _mm512_storeu_si512(out + (first + row) * out_features + block * kBlockColumns,
                                        reinterpret_cast<__m512i>(rounded));
                }
            }
        }
        if (configured >= 0) _tile_release();
    }
}

void amx_linear(const uint16_t* x, const uint16_t* packed, uint16_t* out, int64_t rows, int64_t out_features,
                int64_t in_features, int threads) {
    const int64_t k_steps = in_features / kTileDepth, blocks = out_features / kBlockColumns;
    // Rows a pass covers: their x (about 1 MiB) stays in L2 while every block of the weights passes by; a whole
    // prefill's x would stream from memory again for each block (2048 rows: 1.17x faster in passes).
    const int64_t chunk = std::max<int64_t>(2 * kTileRows, (1 << 19) / in_features / (2 * kTileRows) * (2 * kTileRows));
#pragma omp parallel num_threads(threads)
    {
        alignas(64) float c[kTileRows * 2][kBlockColumns];
        int configured_first = -1, configured_second = -1;
        for (int64_t chunk_start = 0; chunk_start < rows; chunk_start += chunk) {
            const int64_t chunk_end = std::min(rows, chunk_start + chunk);
#pragma omp for schedule(static)
            for (int64_t block = 0; block < blocks; ++block) {
                const uint16_t* weights = packed + block * k_steps * 2 * kTileElements;
                for (int64_t row = chunk_start; row < chunk_end; row += 2 * kTileRows) {
                    const int64_t left = rows - row;
                    const int first = static_cast<int>(std::min<int64_t>(left, kTileRows));
                    const int second = static_cast<int>(std::min<int64_t>(std::max<int64_t>(left - kTileRows, 0),
                                                                          kTileRows));
                    if (first != configured_first || second != configured_second) {
                        configure(first, second);
                        configured_first = first;
                        configured_second = second;
                    }
                    // Only the first pass over a block reads it from memory; later row blocks find it in cache.
                    multiply_block(x + row * in_features, weights, k_steps, in_features, second > 0,
                                   row == chunk_start);
                    _tile_stored(0, &c[0][0], sizeof(c[0]));
                    _tile_stored(1, &c[0][16], sizeof(c[0]));
                    if (second) {
                        _tile_stored(2, &c[kTileRows][0], sizeof(c[0]));
                        _tile_stored(3, &c[kTileRows][16], sizeof(c[0]));
                    }
                    store_block(c, first + second, out + row * out_features + block * kBlockColumns, out_features);
                }
            }
        }
        if (configured_first >= 0) _tile_release();
    }
}
#endif

}  // namespace

// Whether this build targets AMX-BF16 and the kernel may use the tiles (asks Linux for them once per process).
extern "C" bool spindle_amx_enable() { return spindle::amx_usable(); }

// Whether this build has the 4- and 8-bit kernels (they need AVX512-BF16; the 4-bit one uses AMX tiles too where
// there are any).
extern "C" bool spindle_quantized_linear_enable() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
}

// W [N, K] (N and K multiples of 32) into the kernel's tile layout, ``packed`` [N * K].
extern "C" void spindle_amx_pack_bf16(const uint16_t* weight, uint16_t* packed, int64_t out_features,
                                      int64_t in_features) {
    const int64_t k_steps = in_features / kTileDepth;
    for (int64_t block = 0; block < out_features / kBlockColumns; ++block)
        for (int64_t step = 0; step < k_steps; ++step)
            for (int half = 0; half < 2; ++half) {
                uint16_t* tile = packed + ((block * k_steps + step) * 2 + half) * kTileElements;
                const uint16_t* source = weight + (block * kBlockColumns + half * 16) * in_features + step * kTileDepth;
                for (int pair = 0; pair < 16; ++pair)
                    for (int column = 0; column < 16; ++column) {
                        tile[pair * 32 + column * 2] = source[column * in_features + pair * 2];
                        tile[pair * 32 + column * 2 + 1] = source[column * in_features + pair * 2 + 1];
                    }
            }
}

// out [M, N] = x [M, K] @ W^T for W packed by spindle_amx_pack_bf16. False if this build has no AMX kernel.
extern "C" bool spindle_amx_linear_bf16(const uint16_t* x, const uint16_t* packed, uint16_t* out, int64_t rows,
                                        int64_t out_features, int64_t in_features, int threads) {
#ifdef SPINDLE_HAS_AMX
    amx_linear(x, packed, out, rows, out_features, in_features, threads);
    return true;
#else
    (void)x, (void)packed, (void)out, (void)rows, (void)out_features, (void)in_features, (void)threads;
    return false;
#endif
}

// Levels [N, K] (one per byte, 0-15) with fp16 scales and minimums [N, K / 32] into the kernel's 4-bit layout,
// ``packed`` [N * K / 32 * 20] bytes.
extern "C" void spindle_pack_int4_bf16(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums,
                                           uint8_t* packed, int64_t out_features, int64_t in_features) {
    const int64_t k_steps = in_features / kTileDepth;
    for (int64_t block = 0; block < out_features / kBlockColumns; ++block)
        for (int64_t step = 0; step < k_steps; ++step) {
            uint8_t* target = packed + (block * k_steps + step) * kInt4StepBytes;
            auto* fp16 = reinterpret_cast<uint16_t*>(target);
            for (int column = 0; column < kBlockColumns; ++column) {
                fp16[column] = scales[(block * kBlockColumns + column) * k_steps + step];
                fp16[kBlockColumns + column] = minimums[(block * kBlockColumns + column) * k_steps + step];
            }
            // Lane i of tile row r: column i / 2 of the half, channel 2 r + i % 2 of the group.
            for (int half = 0; half < 2; ++half)
                for (int row = 0; row < 16; ++row)
                    for (int lane = 0; lane < 32; ++lane) {
                        const int64_t column = block * kBlockColumns + half * 16 + lane / 2;
                        const int64_t channel = step * kTileDepth + 2 * row + lane % 2;
                        const uint8_t level = levels[column * in_features + channel] & 0xF;
                        uint8_t& byte = target[2 * kInt4ScaleBytes + half * kInt4TileBytes + row / 2 * 32 + lane];
                        byte = static_cast<uint8_t>(row % 2 ? (byte | level << 4) : level);
                    }
        }
}

// Values [N, K] (int8, -127 to 127) with fp16 scales [N, K / 32] into the 8-bit layout, ``packed``
// [N * K / 32 * 34] bytes.
extern "C" void spindle_pack_int8_bf16(const int8_t* values, const uint16_t* scales, uint8_t* packed,
                                       int64_t out_features, int64_t in_features) {
    const int64_t k_steps = in_features / kTileDepth;
    for (int64_t block = 0; block < out_features / kBlockColumns; ++block)
        for (int64_t step = 0; step < k_steps; ++step) {
            uint8_t* target = packed + (block * k_steps + step) * kInt8StepBytes;
            auto* fp16 = reinterpret_cast<uint16_t*>(target);
            for (int column = 0; column < kBlockColumns; ++column)
                fp16[column] = scales[(block * kBlockColumns + column) * k_steps + step];
            // Lane i of tile row r: column i / 2 of the half, channel 2 r + i % 2 of the group.
            for (int half = 0; half < 2; ++half)
                for (int row = 0; row < 16; ++row)
                    for (int lane = 0; lane < 32; ++lane) {
                        const int64_t column = block * kBlockColumns + half * 16 + lane / 2;
                        const int64_t channel = step * kTileDepth + 2 * row + lane % 2;
                        target[kInt8ScaleBytes + (half * 16 + row) * 32 + lane] =
                            static_cast<uint8_t>(values[column * in_features + channel]);
                    }
        }
}

// out [M, N] = x [M, K] @ W^T for W packed by spindle_pack_int8_bf16, on the vector units. False if this build has
// no kernel (no AVX512-BF16).
extern "C" bool spindle_linear_int8_bf16(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows,
                                         int64_t out_features, int64_t in_features, int threads) {
#if defined(__AVX512BF16__)
    linear_vector<Int8Layout>(x, packed, out, rows, out_features, in_features, threads);
    return true;
#else
    (void)x, (void)packed, (void)out, (void)rows, (void)out_features, (void)in_features, (void)threads;
    return false;
#endif
}

// out [M, N] = x [M, K] @ W^T for W packed by spindle_pack_int4_bf16: on the tiles if asked and the process may use
// them, else on the vector units. Made for small steps: the levels are unpacked again for each 16 rows. False if this build has neither kernel (no AVX512-BF16).
extern "C" bool spindle_linear_int4_bf16(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows,
                                         int64_t out_features, int64_t in_features, int threads, bool use_tiles) {
#ifdef SPINDLE_HAS_AMX
    if (use_tiles && spindle::amx_usable()) {
        linear_int4(x, packed, out, rows, out_features, in_features, threads);
        return true;
    }
#endif
#if defined(__AVX512BF16__)
    linear_vector<Int4Layout>(x, packed, out, rows, out_features, in_features, threads);
    return true;
#else
    (void)x, (void)packed, (void)out, (void)rows, (void)out_features, (void)in_features, (void)threads,
        (void)use_tiles;
    return false;
#endif
}
