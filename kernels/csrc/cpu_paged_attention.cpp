// Paged decode attention for the CPU: a few query tokens per sequence (one for a decode, one plus the drafts when
// verifying speculative drafts), K/V read in place through block tables.
//
// The vectorised PyTorch path has to gather every sequence's K/V blocks into a contiguous copy before its matmuls;
// at serving batch sizes that copy costs more than the attention arithmetic. This kernel streams K and V straight
// from the cache blocks, so each byte of the cache is read once per step (twice counting the two passes' K then V).
//
// Work is split flash-decoding style into (sequence, KV head, context partition) items so that one long sequence
// still keeps every core busy; each item writes an unnormalised partial result with its running max and sum, and a
// second loop merges the partials of each (query row, head). Query heads that share a KV head (grouped-query
// attention), and the query rows of one sequence, are processed together so each K/V row is read and converted to
// fp32 once and used for all of them: row r of a sequence's R rows sees its context up to its own token, so the
// last R - 1 - r positions are masked for it.
//
// Built at first use by kernels/native.py (g++ -O3 -march=native -fopenmp) and called through ctypes; OpenMP
// resolves to the libgomp PyTorch already loaded, so the two share one thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_vector.h"
#include "numeric.h"

namespace {

using spindle::BFloat16;
using spindle::exp_nonpositive;
using spindle::store;

// Context tokens per work item: long contexts are split (flash-decoding) so a few sequences still fill every thread.
constexpr int kItemsPerThread = 4;
constexpr int kMinPartition = 128;
constexpr int kMaxPartition = 1024;

struct Shape {
    int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
};

// Where a sequence's query rows are: rows [first, first + count), the last one at context length `length`.
struct Rows {
    int first, count, length;
};

struct Scratch {
    std::vector<float> scores;
    std::vector<Vec> vectors;
};

// One work item: every query head of every query row of one sequence over context positions [begin, end) (row r
// of `rows.count` only up to its own position). A token's K (or V) rows
// for all KV heads are contiguous in the cache, so the item streams whole cache blocks front to back, which the
// hardware prefetcher follows; splitting items by KV head instead was measured 1.5x slower (strided reads).
// Writes per (row, query head): its unnormalised output [head_dim], then the max and the sum of exp(score - max)
// (-inf and 0 for a row that sees none of the positions). Chunks = head_dim / kLanes is a template parameter so the
// row vectors live in registers.
template <typename T, int Chunks>
void attend_partition(const T* query, const T* key_cache, const T* value_cache, const int32_t* table, int begin,
                      int end, int num_rows, int context_len, const Shape& shape, float scale, float* partial,
                      Scratch& scratch) {
    constexpr int dim = Chunks * kLanes;
    const int heads = shape.num_heads;
    const int group = heads / shape.num_kv_heads;
    const int length = end - begin;
    const int row_heads = num_rows * heads;  // (row, head) pairs, row-major
    const int64_t token_stride = static_cast<int64_t>(shape.num_kv_heads) * dim;
    const int64_t block_stride = token_stride * shape.block_size;
    scratch.scores.resize(static_cast<size_t>(row_heads) * length);
    scratch.vectors.assign(static_cast<size_t>(row_heads) * (Chunks * 2 + kLanes), Vec{});
    float* scores = scratch.scores.data();  // [rows * heads, length]
    Vec* q = scratch.vectors.data();        // [rows * heads, Chunks], pre-scaled
    Vec* acc = q + static_cast<size_t>(row_heads) * Chunks;  // [rows * heads, Chunks]
    // [rows * heads, kLanes]: the dot products of kLanes tokens before their lanes are summed (sum_lanes)
    Vec* products = acc + static_cast<size_t>(row_heads) * Chunks;

    // Visit the context token by token: `visit(t, row)` for t in [0, length), row = the token's rows for all heads.
    // Blocks are scattered through the pool, so the hardware prefetcher stalls at every block boundary; while one
    // block is read, the same row of the next block is prefetched (measured 1.4x on a 128-sequence batch).
    const int row_bytes = static_cast<int>(token_stride * sizeof(T));
    auto for_each_token = [&](const T* cache, auto&& visit) {
        int position = begin;
        while (position < end) {
            const int block = position / shape.block_size;
            const int offset = position % shape.block_size;
            const int count = std::min(shape.block_size - offset, end - position);
            const T* row = cache + table[block] * block_stride + offset * token_stride;
            const bool has_next = (block + 1) * shape.block_size < end;
            const char* next = reinterpret_cast<const char*>(cache + (has_next ? table[block + 1] : table[block]) *
                                                                         block_stride + offset * token_stride);
            for (int i = 0; i < count; ++i, row += token_stride, next += row_bytes) {
                if (has_next)
                    for (int byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(next + byte);
                visit(position - begin + i, row);
            }
            position += count;
        }
    };

    for (int rh = 0; rh < row_heads; ++rh)
        for (int l = 0; l < Chunks; ++l) q[rh * Chunks + l] = load_lanes(query + rh * dim + kLanes * l) * scale;
    for_each_token(key_cache, [&](int t, const T* row) {
        const int slot = lane_slot(t % kLanes);
        for (int kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
            Vec k[Chunks];
            for (int l = 0; l < Chunks; ++l) k[l] = load_lanes(row + kv_head * dim + kLanes * l);
            for (int r = 0; r < num_rows; ++r)
                for (int h = r * heads + kv_head * group; h < r * heads + (kv_head + 1) * group; ++h) {
                    const Vec* qh = q + h * Chunks;
                    Vec sum = qh[0] * k[0];
                    for (int l = 1; l < Chunks; ++l) sum += qh[l] * k[l];
                    products[h * kLanes + slot] = sum;
                }
        }
        // Every kLanes tokens (and at the end) the slots' lane sums become scores; a partial flush stores only the
        // lanes of slots written since the last one.
        if (t % kLanes == kLanes - 1 || t == length - 1) {
            const int first = t - t % kLanes;
            for (int rh = 0; rh < row_heads; ++rh) {
                const Vec sums = sum_lanes(products + rh * kLanes);
                std::memcpy(scores + static_cast<size_t>(rh) * length + first, &sums, (t - first + 1) * sizeof(float));
            }
        }
    });

    for (int rh = 0; rh < row_heads; ++rh) {
        float* s = scores + static_cast<size_t>(rh) * length;
        // Row r's token is at position context_len - (num_rows - 1 - r): it sees nothing after it.
        const int row_end = context_len - (num_rows - 1 - rh / heads);
        const int seen = std::clamp(row_end - begin, 0, length);
        float peak = -INFINITY;
#pragma omp simd reduction(max : peak)
        for (int t = 0; t < seen; ++t) peak = std::max(peak, s[t]);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int t = 0; t < seen; ++t) {
            s[t] = exp_nonpositive(s[t] - peak);
            total += s[t];
        }
        std::fill(s + seen, s + length, 0.0f);
        partial[rh * (dim + 2) + dim] = peak;
        partial[rh * (dim + 2) + dim + 1] = total;
    }

    for_each_token(value_cache, [&](int t, const T* row) {
        for (int kv_head = 0; kv_head < shape.num_kv_heads; ++kv_head) {
            Vec v[Chunks];
            for (int l = 0; l < Chunks; ++l) v[l] = load_lanes(row + kv_head * dim + kLanes * l);
            for (int r = 0; r < num_rows; ++r)
                for (int h = r * heads + kv_head * group; h < r * heads + (kv_head + 1) * group; ++h) {
                    const float weight = scores[static_cast<size_t>(h) * length + t];
                    for (int l = 0; l < Chunks; ++l) acc[h * Chunks + l] += weight * v[l];
                }
        }
    });
    for (int rh = 0; rh < row_heads; ++rh) std::memcpy(partial + rh * (dim + 2), acc + rh * Chunks, sizeof(Vec) * Chunks);
}

template <typename T, int Chunks>
void decode_attention(const T* query, const T* key_cache, const T* value_cache, const int32_t* block_tables,
                      const int32_t* context_lens, const int32_t* row_counts, T* output, const Shape& shape,
                      float scale, int num_threads) {
    constexpr int dim = Chunks * kLanes;
    const int heads = shape.num_heads;
    int max_len = 1, max_rows = 1;
    std::vector<Rows> rows(shape.num_seqs);
    std::vector<int> row_seq;  // each query row's sequence
    for (int s = 0; s < shape.num_seqs; ++s) {
        rows[s] = Rows{static_cast<int>(row_seq.size()), row_counts[s], context_lens[s]};
        row_seq.insert(row_seq.end(), row_counts[s], s);
        max_len = std::max(max_len, context_lens[s]);
        max_rows = std::max(max_rows, row_counts[s]);
    }
    // Enough items to balance the threads, none so short that merging partials dominates.
    const int wanted_parts = (kItemsPerThread * num_threads + shape.num_seqs - 1) / shape.num_seqs;
    const int partition = std::clamp((max_len + wanted_parts - 1) / wanted_parts, kMinPartition, kMaxPartition);
    const int max_parts = (max_len + partition - 1) / partition;
    const int64_t row_floats = static_cast<int64_t>(heads) * (dim + 2);
    const int64_t item_floats = max_rows * row_floats;
    const int64_t num_items = static_cast<int64_t>(shape.num_seqs) * max_parts;
    std::vector<float> partials(num_items * item_floats);

#pragma omp parallel num_threads(num_threads)
    {
        Scratch scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_items; ++item) {
            const int seq = static_cast<int>(item / max_parts);
            const Rows& own = rows[seq];
            const int begin = static_cast<int>(item % max_parts) * partition;
            const int end = std::min(own.length, begin + partition);
            if (begin >= end) continue;
            attend_partition<T, Chunks>(query + static_cast<int64_t>(own.first) * heads * dim, key_cache, value_cache,
                                       block_tables + static_cast<int64_t>(seq) * shape.max_blocks, begin, end,
                                       own.count, own.length, shape, scale, partials.data() + item * item_floats,
                                       scratch);
        }

#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < static_cast<int64_t>(row_seq.size()) * heads; ++pair) {
            const int row = static_cast<int>(pair / heads);
            const int head = static_cast<int>(pair % heads);
            const int seq = row_seq[row];
            const int parts = (std::max(context_lens[seq], 1) + partition - 1) / partition;
            const float* first =
                partials.data() + seq * max_parts * item_floats + (row - rows[seq].first) * row_floats + head * (dim + 2);
            // Finite: every row sees the first position. A partition wholly after the row's own position has max
            // -inf and sum 0, and weighs nothing.
            float peak = -INFINITY;
            for (int p = 0; p < parts; ++p) peak = std::max(peak, first[p * item_floats + dim]);
            float total = 0.0f;
            float merged[dim] = {};
            for (int p = 0; p < parts; ++p) {
                const float* part = first + p * item_floats;
                const float weight = exp_nonpositive(part[dim] - peak);
                total += weight * part[dim + 1];
                for (int d = 0; d < dim; ++d) merged[d] += weight * part[d];
            }
            T* out = output + (static_cast<int64_t>(row) * heads + head) * dim;
            const float inverse = 1.0f / total;
            for (int d = 0; d < dim; ++d) store(merged[d] * inverse, out + d);
        }
    }
}

// Returns false for a head_dim without an instantiation (the caller then uses another path).
template <typename T>
bool dispatch_head_dim(const T* query, const T* key_cache, const T* value_cache, const int32_t* block_tables,
                       const int32_t* context_lens, const int32_t* row_counts, T* output, const Shape& shape,
                       float scale, int num_threads) {
    switch (shape.head_dim) {
#define SPINDLE_HEAD_DIM_CASE(dim)                                                                                \
    case dim:                                                                                                     \
        decode_attention<T, dim / kLanes>(query, key_cache, value_cache, block_tables, context_lens, row_counts, output,  \
                                   shape, scale, num_threads);                                                    \
        return true;
        SPINDLE_HEAD_DIM_CASE(64)
        SPINDLE_HEAD_DIM_CASE(80)
        SPINDLE_HEAD_DIM_CASE(96)
        SPINDLE_HEAD_DIM_CASE(128)
        SPINDLE_HEAD_DIM_CASE(256)
#undef SPINDLE_HEAD_DIM_CASE
        default:
            return false;
    }
}

}  // namespace

#define SPINDLE_DECODE_ENTRY(name, type)                                                                            \
    extern "C" bool name(const void* query, const void* key_cache, const void* value_cache,                        \
                         const int32_t* block_tables, const int32_t* context_lens, const int32_t* row_counts,       \
                         void* output, int num_seqs,                                                                \
                         int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale, \
                         int num_threads) {                                                                         \
        const Shape shape{num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks};                     \
        return dispatch_head_dim(static_cast<const type*>(query), static_cast<const type*>(key_cache),                      \
                         static_cast<const type*>(value_cache), block_tables, context_lens, row_counts,             \
                         static_cast<type*>(output), shape, scale, num_threads);                                    \
    }

SPINDLE_DECODE_ENTRY(spindle_decode_attention_f32, float)
SPINDLE_DECODE_ENTRY(spindle_decode_attention_f16, spindle::Half)
SPINDLE_DECODE_ENTRY(spindle_decode_attention_bf16, BFloat16)
