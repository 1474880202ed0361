// Every decoder layer of a decode step in one call: the same kernels, in the same order, as the layer-by-layer path
// (engine/models/llama.py) calls them one by one from Python, so the results are the same bit for bit.
//
// A one-sequence decode step of the default model reads about 66 MB of 4-bit weights in its layers (their kernels
// took 1.3 ms here) but made some 300 calls through ctypes and PyTorch, each a few microseconds of interpreter and
// allocator work on top of the kernel's own: the step took 5.7 ms, 3.1 in one call. Here the step's scratch rows
// are allocated once and the layers run back to back.
//
// Weights are the 4-bit copies of kernels/csrc/cpu_linear.cpp; the K/V caches plain bf16 blocks.

#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
void spindle_rms_norm_bf16(const void* input, void* residual, const void* weight, void* out, int64_t rows, int hidden,
                           float eps);
void spindle_silu_and_mul_bf16(const void* gate_up, void* out, int64_t rows, int width);
void spindle_rotary_bf16(const void* source, int64_t source_stride, const void* cos, const void* sin, void* q_out,
                         void* k_out, int64_t rows, int q_heads, int k_heads, int dim);
bool spindle_decode_attention_bf16(const void* query, const void* key_cache, const void* value_cache,
                                   const int32_t* block_tables, const int32_t* context_lens, const int32_t* row_counts,
                                   void* output, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                   int block_size, int max_blocks, float scale, int num_threads);
bool spindle_linear_int4_bf16(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows,
                              int64_t out_features, int64_t in_features, int threads, bool use_tiles);
}

namespace {

// One layer's tensors, as addresses: what a row of the layer table holds, in this order.
enum LayerField { kInputNorm, kQkv, kOutput, kPostNorm, kGateUp, kDown, kKeyCache, kValueCache, kLayerFields };

template <typename T>
T* at(const int64_t* layer, LayerField field) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(layer[field]));
}

}  // namespace

// The model's shape, and the step's sequences as the decode attention kernel reads them.
struct SpindleDecoderShape {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
};
struct SpindleDecodeBatch {
    const int32_t* block_tables;  // [sequences, max_blocks]
    const int32_t* context_lens;  // [sequences]
    const int32_t* row_counts;    // [sequences]
    int64_t sequences, max_blocks;
};

// residual [rows, hidden]: the step's embeddings in, the residual stream before the final norm out; out [rows,
// hidden]: the final norm's output. cos and sin [rows, head_dim]; slots [rows]: each row's flat cache slot. False
// where the attention kernel has no instantiation for the head size.
extern "C" bool spindle_decode_layers_bf16(const int64_t* layer_table, const SpindleDecoderShape* shape,
                                           const SpindleDecodeBatch* batch, const void* final_norm,
                                           uint16_t* residual, uint16_t* out, const uint16_t* cos,
                                           const uint16_t* sin, const int64_t* slots, int64_t rows, int threads) {
    const int64_t hidden = shape->hidden, head_dim = shape->head_dim, q_size = shape->heads * head_dim;
    const int64_t kv_size = shape->kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    const int hidden_int = static_cast<int>(hidden);
    std::vector<uint16_t> normed(rows * hidden), qkv(rows * qkv_size), query(rows * q_size), key(rows * kv_size),
        attended(rows * q_size), gate_up(rows * 2 * shape->intermediate), activated(rows * shape->intermediate),
        sublayer(rows * hidden);
    for (int64_t index = 0; index < shape->layers; ++index) {
        const int64_t* layer = layer_table + index * kLayerFields;
        // The first layer normalises the embeddings themselves; each later one adds the MLP output before it.
        spindle_rms_norm_bf16(index ? sublayer.data() : residual, index ? residual : nullptr,
                              at<void>(layer, kInputNorm), normed.data(), rows, hidden_int, shape->eps);
        spindle_linear_int4_bf16(normed.data(), at<uint8_t>(layer, kQkv), qkv.data(), rows, qkv_size, hidden, threads,
                                 true);
        spindle_rotary_bf16(qkv.data(), qkv_size, cos, sin, query.data(), key.data(), rows,
                            static_cast<int>(shape->heads), static_cast<int>(shape->kv_heads),
                            static_cast<int>(head_dim));
        auto* key_cache = at<uint16_t>(layer, kKeyCache);
        auto* value_cache = at<uint16_t>(layer, kValueCache);
        for (int64_t row = 0; row < rows; ++row) {
            std::memcpy(key_cache + slots[row] * kv_size, key.data() + row * kv_size, kv_size * sizeof(uint16_t));
            std::memcpy(value_cache + slots[row] * kv_size, qkv.data() + row * qkv_size + q_size + kv_size,
                        kv_size * sizeof(uint16_t));
        }
        if (!spindle_decode_attention_bf16(query.data(), key_cache, value_cache, batch->block_tables,
                                           batch->context_lens, batch->row_counts, attended.data(),
                                           static_cast<int>(batch->sequences), static_cast<int>(shape->heads),
                                           static_cast<int>(shape->kv_heads), static_cast<int>(head_dim),
                                           static_cast<int>(shape->block_size), static_cast<int>(batch->max_blocks),
                                           shape->scale, threads))
            return false;
        spindle_linear_int4_bf16(attended.data(), at<uint8_t>(layer, kOutput), sublayer.data(), rows, hidden, q_size,
                                 threads, true);
        spindle_rms_norm_bf16(sublayer.data(), residual, at<void>(layer, kPostNorm), normed.data(), rows, hidden_int,
                              shape->eps);
        spindle_linear_int4_bf16(normed.data(), at<uint8_t>(layer, kGateUp), gate_up.data(), rows,
                                 2 * shape->intermediate, hidden, threads, true);
        spindle_silu_and_mul_bf16(gate_up.data(), activated.data(), rows, static_cast<int>(shape->intermediate));
        spindle_linear_int4_bf16(activated.data(), at<uint8_t>(layer, kDown), sublayer.data(), rows, hidden,
                                 shape->intermediate, threads, true);
    }
    spindle_rms_norm_bf16(sublayer.data(), residual, final_norm, out, rows, hidden_int, shape->eps);
    return true;
}
