// A bf16 linear layer on AMX tiles: out[M, N] = x[M, K] @ W[N, K]^T with fp32 accumulation, rounded to bf16.
//
// A decode step of a few dozen rows is bound by reading the weights, and oneDNN's matmul, called from PyTorch, read
// them at about half the rate this machine streams memory at. This kernel keeps each weight in the tiles' own layout
// (packed once, at load), walks it once per call in order while prefetching ahead, and reuses every weight tile for
// 32 rows: within a few percent of the memory bandwidth up to 32 rows, and ahead of oneDNN at every row count
// measured.
//
// Compiled to nothing but ``spindle_amx_enable`` returning false where the compiler does not target AMX-BF16
// (-march=native on a CPU without it, see amx.h); Linux also has to grant the process the tile state, which the same
// call asks for.

#include <algorithm>
#include <cstdint>

#include "amx.h"

namespace {

// A weight tile holds 32 input channels (as 16 rows of pairs) of 16 output channels: 512 bf16. Each 32-channel
// output block stores its two tiles per 32 input channels next to each other, blocks one after another.
constexpr int kTileRows = 16;
constexpr int64_t kTileDepth = 32, kBlockColumns = 32, kTileElements = 512;

#ifdef SPINDLE_HAS_AMX
// Far enough ahead of the tile being read for the load to arrive in time, near enough to stay in L1: 4 steps of K.
constexpr int64_t kPrefetchBytes = 8192;

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

void amx_linear(const uint16_t* x, const uint16_t* packed, uint16_t* out, int64_t rows, int64_t out_features,
                int64_t in_features, int threads) {
    const int64_t k_steps = in_features / kTileDepth, blocks = out_features / kBlockColumns;
#pragma omp parallel num_threads(threads)
    {
        alignas(64) float c[kTileRows * 2][kBlockColumns];
        int configured_first = -1, configured_second = -1;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const uint16_t* weights = packed + block * k_steps * 2 * kTileElements;
            for (int64_t row = 0; row < rows; row += 2 * kTileRows) {
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
                multiply_block(x + row * in_features, weights, k_steps, in_features, second > 0, row == 0);
                _tile_stored(0, &c[0][0], sizeof(c[0]));
                _tile_stored(1, &c[0][16], sizeof(c[0]));
                if (second) {
                    _tile_stored(2, &c[kTileRows][0], sizeof(c[0]));
                    _tile_stored(3, &c[kTileRows][16], sizeof(c[0]));
                }
                store_block(c, first + second, out + row * out_features + block * kBlockColumns, out_features);
            }
        }
        if (configured_first >= 0) _tile_release();
    }
}
#endif

}  // namespace

// Whether this build targets AMX-BF16 and the kernel may use the tiles (asks Linux for them once per process).
extern "C" bool spindle_amx_enable() { return spindle::amx_usable(); }

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
