// Causal attention of prompts without a cached prefix (bf16): each prompt's rows attend to its own keys up to
// themselves, read straight from the step's Q/K/V rows.
//
// PyTorch's fused CPU attention ran such a step at about a tenth of the machine's bf16 rate on a CPU without AMX
// (its bf16 path converts to fp32 and calls fp32 GEMMs): a sixth of a prefill step of 128-token prompts. Here the
// scores are fp32 dot products on AVX512-BF16 (vdpbf16ps: each bf16 product is exact in fp32, so the scores are
// those of an fp32 computation) and the weighted sum of V is taken in fp32 from fp32 probabilities: only the output
// is rounded to bf16.
//
// Work items are (prompt, KV head, block of query rows); an item packs the keys its rows see into the instruction's
// pair layout (16 keys x 2 channels per register) and the values into fp32 once, then serves the block's rows for
// every query head of the KV head. Compiled to nothing but a false ``spindle_prompt_attention_enable`` where the
// compiler does not target AVX512-BF16.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "numeric.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define SPINDLE_HAS_PROMPT_ATTENTION 1
#endif

namespace {

#ifdef SPINDLE_HAS_PROMPT_ATTENTION
constexpr int kKeysPerVector = 16;
constexpr int kRowsPerItem = 32;  // query rows per work item: items stay many enough to balance the threads
constexpr int kRowsPerGroup = 4;  // query rows scored together against each register of keys
static_assert(kRowsPerItem % kRowsPerGroup == 0 && kKeysPerVector % kRowsPerGroup == 0, "a group sees one set of key blocks");

struct Strides {
    int64_t query, key, value, out;  // elements between consecutive rows (tokens)
};

struct Item {
    int prompt, kv_head, first_row;
};

struct Scratch {
    std::vector<uint32_t> keys;  // [key blocks + in-flight padding][pairs][16]: a key's 2 channels per 32-bit lane
    std::vector<float> values;   // [keys][head_dim]
    std::vector<float> scores;   // [kRowsPerGroup][keys rounded up to 16]
};

inline float bf16_to_float(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
}

// Scores of ``Rows`` query rows (each row's channel pairs broadcast from ``q[r]``) against ``Blocks`` consecutive
// blocks of 16 packed keys, into ``scores[r]``: each key register serves every row, and the Rows x Blocks sums are
// independent, which hides the instruction's latency.
template <int Rows, int Blocks, int Pairs>
inline void score_tile(const uint16_t* const* q, const uint32_t* tiles, __m512 scale, float* const* scores) {
    __m512 acc[Rows][Blocks];
    for (int r = 0; r < Rows; ++r)
        for (int b = 0; b < Blocks; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int pair = 0; pair < Pairs; ++pair) {
        __m512i keys[Blocks];
        for (int b = 0; b < Blocks; ++b)
            keys[b] = _mm512_loadu_si512(tiles + (static_cast<size_t>(b) * Pairs + pair) * kKeysPerVector);
        for (int r = 0; r < Rows; ++r) {
            int32_t channels;
            std::memcpy(&channels, q[r] + 2 * pair, 4);
            const __m512bh broadcast = reinterpret_cast<__m512bh>(_mm512_set1_epi32(channels));
            for (int b = 0; b < Blocks; ++b)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], broadcast, reinterpret_cast<__m512bh>(keys[b]));
        }
    }
    for (int r = 0; r < Rows; ++r)
        for (int b = 0; b < Blocks; ++b)
            _mm512_storeu_ps(scores[r] + b * kKeysPerVector, _mm512_mul_ps(acc[r][b], scale));
}

// score_tile over ``blocks`` key blocks, two at a time.
template <int Rows, int Pairs>
inline void score_rows(const uint16_t* const* q, const uint32_t* packed, int blocks, __m512 scale, float* const* scores) {
    float* at[Rows];
    int block = 0;
    for (; block < blocks; block += 2) {
        for (int r = 0; r < Rows; ++r) at[r] = scores[r] + block * kKeysPerVector;
        const uint32_t* tiles = packed + static_cast<size_t>(block) * Pairs * kKeysPerVector;
        if (block + 2 <= blocks)
            score_tile<Rows, 2, Pairs>(q, tiles, scale, at);
        else
            score_tile<Rows, 1, Pairs>(q, tiles, scale, at);
    }
}

// Softmax of one row's scores over its ``visible`` keys and the weighted sum of their values, rounded into ``out``.
template <int Lanes>
inline void weigh_values(float* scores, int visible, const float* values, uint16_t* out) {
    constexpr int dim = Lanes * 16;
    const int blocks = (visible + kKeysPerVector - 1) / kKeysPerVector;
    // The last block's keys past the row's own are masked; its lanes are the only partial ones.
    const __mmask16 last_lanes = static_cast<__mmask16>((1u << (visible - (blocks - 1) * kKeysPerVector)) - 1);
    const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    float* last_scores = scores + (blocks - 1) * kKeysPerVector;
    _mm512_storeu_ps(last_scores, _mm512_mask_mov_ps(minus_infinity, last_lanes, _mm512_loadu_ps(last_scores)));
    __m512 maxima = minus_infinity;
    for (int b = 0; b < blocks; ++b) maxima = _mm512_max_ps(maxima, _mm512_loadu_ps(scores + b * kKeysPerVector));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(maxima));
    __m512 sums = _mm512_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
        __m512 weights[1] = {_mm512_sub_ps(_mm512_loadu_ps(scores + b * kKeysPerVector), max)};
        spindle::exp_nonpositive(weights);
        _mm512_storeu_ps(scores + b * kKeysPerVector, weights[0]);
        sums = b + 1 < blocks ? _mm512_add_ps(sums, weights[0])
                              : _mm512_mask_add_ps(sums, last_lanes, sums, weights[0]);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    __m512 total[2][Lanes];
    for (int half = 0; half < 2; ++half)
        for (int lane = 0; lane < Lanes; ++lane) total[half][lane] = _mm512_setzero_ps();
    int j = 0;
    for (; j + 1 < visible; j += 2)  // two keys at a time: twice the independent sums
        for (int half = 0; half < 2; ++half) {
            const __m512 weight = _mm512_set1_ps(scores[j + half]);
            const float* v = values + static_cast<size_t>(j + half) * dim;
            for (int lane = 0; lane < Lanes; ++lane)
                total[half][lane] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + 16 * lane), total[half][lane]);
        }
    if (j < visible) {
        const __m512 weight = _mm512_set1_ps(scores[j]);
        const float* v = values + static_cast<size_t>(j) * dim;
        for (int lane = 0; lane < Lanes; ++lane)
            total[0][lane] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + 16 * lane), total[0][lane]);
    }
    for (int lane = 0; lane < Lanes; ++lane) {
        const __m512 result = _mm512_mul_ps(_mm512_add_ps(total[0][lane], total[1][lane]), inverse);
        spindle::store_bf16x16(result, out + 16 * lane);
    }
}

// Rows [first, last) of one prompt and query head group, over the prompt's keys [0, last); ``first`` is a multiple
// of kRowsPerGroup, so the rows of a group see the same key blocks.
template <int Lanes>
void attend_item(const uint16_t* query, const uint16_t* key, const uint16_t* value, uint16_t* out, int first,
                 int last, int kv_head, int group, const Strides& strides, float scale, Scratch& scratch) {
    constexpr int dim = Lanes * 16, pairs = dim / 2;
    const int keys = last;
    const int key_blocks = (keys + kKeysPerVector - 1) / kKeysPerVector;
    const size_t row_scores = static_cast<size_t>(key_blocks) * kKeysPerVector;
    scratch.keys.assign(static_cast<size_t>(key_blocks) * pairs * kKeysPerVector, 0u);
    scratch.values.resize(static_cast<size_t>(keys) * dim);
    scratch.scores.resize(row_scores * kRowsPerGroup);
    uint32_t* packed = scratch.keys.data();
    float* values = scratch.values.data();
    for (int j = 0; j < keys; ++j) {
        const uint16_t* row = key + j * strides.key + kv_head * dim;
        uint32_t* lane = packed + static_cast<size_t>(j / kKeysPerVector) * pairs * kKeysPerVector + j % kKeysPerVector;
        for (int pair = 0; pair < pairs; ++pair) std::memcpy(lane + pair * kKeysPerVector, row + 2 * pair, 4);
        const uint16_t* value_row = value + j * strides.value + kv_head * dim;
        for (int d = 0; d < dim; ++d) values[static_cast<size_t>(j) * dim + d] = bf16_to_float(value_row[d]);
    }
    const __m512 scale_vector = _mm512_set1_ps(scale);
    float* scores[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) scores[r] = scratch.scores.data() + r * row_scores;
    for (int row = first; row < last; row += kRowsPerGroup) {
        const int rows = std::min(kRowsPerGroup, last - row), blocks = row / kKeysPerVector + 1;
        for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
            const uint16_t* q[kRowsPerGroup];
            for (int r = 0; r < kRowsPerGroup; ++r) q[r] = query + (row + std::min(r, rows - 1)) * strides.query + head * dim;
            switch (rows) {
                case 4: score_rows<4, pairs>(q, packed, blocks, scale_vector, scores); break;
                case 3: score_rows<3, pairs>(q, packed, blocks, scale_vector, scores); break;
                case 2: score_rows<2, pairs>(q, packed, blocks, scale_vector, scores); break;
                default: score_rows<1, pairs>(q, packed, blocks, scale_vector, scores); break;
            }
            for (int r = 0; r < rows; ++r)
                weigh_values<Lanes>(scores[r], row + r + 1, values, out + (row + r) * strides.out + head * dim);
        }
    }
}

template <int Lanes>
void attend(const uint16_t* query, const uint16_t* key, const uint16_t* value, uint16_t* out, const int32_t* prompts,
            int num_prompts, int num_heads, int num_kv_heads, const Strides& strides, float scale, int threads) {
    std::vector<Item> items;
    for (int prompt = 0; prompt < num_prompts; ++prompt)
        for (int kv_head = 0; kv_head < num_kv_heads; ++kv_head)
            for (int row = 0; row < prompts[2 * prompt + 1]; row += kRowsPerItem) items.push_back({prompt, kv_head, row});
    // Later rows see more keys: the longest items go first so the dynamic schedule ends evenly.
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.first_row > b.first_row; });
    const int group = num_heads / num_kv_heads;
#pragma omp parallel num_threads(threads)
    {
        Scratch scratch;
#pragma omp for schedule(dynamic)
        for (size_t index = 0; index < items.size(); ++index) {
            const Item& item = items[index];
            const int64_t start = prompts[2 * item.prompt], length = prompts[2 * item.prompt + 1];
            const int last = static_cast<int>(std::min<int64_t>(item.first_row + kRowsPerItem, length));
            attend_item<Lanes>(query + start * strides.query, key + start * strides.key, value + start * strides.value,
                               out + start * strides.out, item.first_row, last, item.kv_head, group, strides, scale,
                               scratch);
        }
    }
}
#endif

}  // namespace

// Whether this build has the kernel (it needs a compiler targeting AVX512-BF16).
extern "C" bool spindle_prompt_attention_enable() {
#ifdef SPINDLE_HAS_PROMPT_ATTENTION
    return true;
#else
    return false;
#endif
}

// query [T, H, D], key and value [T, KVH, D] and out [T, H, D], bf16, rows ``*_stride`` elements apart and each
// row's heads contiguous; ``prompts`` [num_prompts][2] = (first row, rows): each prompt's rows attend causally to
// its own keys. False where this build has no kernel or D is not one it was instantiated for.
extern "C" bool spindle_prompt_attention_bf16(const uint16_t* query, const uint16_t* key, const uint16_t* value,
                                              uint16_t* out, const int32_t* prompts, int num_prompts, int num_heads,
                                              int num_kv_heads, int head_dim, int64_t query_stride, int64_t key_stride,
                                              int64_t value_stride, int64_t out_stride, float scale, int threads) {
#ifdef SPINDLE_HAS_PROMPT_ATTENTION
    const Strides strides{query_stride, key_stride, value_stride, out_stride};
    switch (head_dim) {
#define SPINDLE_HEAD_DIM(dim)                                                                                    \
    case dim:                                                                                                    \
        attend<dim / 16>(query, key, value, out, prompts, num_prompts, num_heads, num_kv_heads, strides, scale, \
                         threads);                                                                               \
        return true;
        SPINDLE_HEAD_DIM(64)
        SPINDLE_HEAD_DIM(80)
        SPINDLE_HEAD_DIM(96)
        SPINDLE_HEAD_DIM(128)
        SPINDLE_HEAD_DIM(256)
#undef SPINDLE_HEAD_DIM
        default:
            return false;
    }
#else
    (void)query, (void)key, (void)value, (void)out, (void)prompts, (void)num_prompts, (void)num_heads,
        (void)num_kv_heads, (void)head_dim, (void)query_stride, (void)key_stride, (void)value_stride,
        (void)out_stride, (void)scale, (void)threads;
    return false;
#endif
}
