// Every decoder layer of a decode step in one call: the same kernels, in the same order, as the layer-by-layer path
// (engine/models/llama.py) calls them one by one from Python, so the results are the same bit for bit.
//
// A one-sequence decode step of the default model reads about 66 MB of 4-bit weights in its layers (their kernels
// took 1.3 ms here) but made some 300 calls through ctypes and PyTorch, each a few microseconds of interpreter and
// allocator work on top of the kernel's own: the step took 5.7 ms, 3.1 in one call. Here the step's scratch rows
// are allocated once and the layers run back to back.
//
// In bf16 the weights are the 4-bit copies of kernels/csrc/cpu_linear.cpp, in fp32 those of cpu_linear_f32.cpp (or,
// with int8-quantized activations, of cpu_linear_q8.cpp); the K/V caches are plain blocks of the activations' type.

#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
#define SPINDLE_LAYER_KERNELS(suffix)                                                                                \
    void spindle_rms_norm_##suffix(const void* input, void* residual, const void* weight, void* out, int64_t rows,  \
                                   int hidden, float eps);                                                          \
    void spindle_silu_and_mul_##suffix(const void* gate_up, void* out, int64_t rows, int width);                    \
    void spindle_rotary_##suffix(const void* source, int64_t source_stride, const void* cos, const void* sin,        \
                                 void* q_out, void* k_out, int64_t rows, int q_heads, int k_heads, int dim);        \
    bool spindle_decode_attention_##suffix(const void* query, const void* key_cache, const void* value_cache,       \
                                           const int32_t* block_tables, const int32_t* context_lens,                \
                                           const int32_t* row_counts, void* output, int num_seqs, int num_heads,    \
                                           int num_kv_heads, int head_dim, int block_size, int max_blocks,          \
                                           float scale, int num_threads);
SPINDLE_LAYER_KERNELS(bf16)
SPINDLE_LAYER_KERNELS(f32)
#undef SPINDLE_LAYER_KERNELS
bool spindle_linear_int4_bf16(const uint16_t* x, const uint8_t* packed, uint16_t* out, int64_t rows,
                              int64_t out_features, int64_t in_features, int threads, bool use_tiles);
bool spindle_linear_int4_f32(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
                             int64_t in_features, int threads);
bool spindle_linear_int4_q8(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
                            int64_t in_features, int threads);
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

namespace {

// The kernels a decode step calls, by the activations' type (bf16 as uint16_t bits, or fp32).
struct Bf16Kernels {
    using T = uint16_t;
    static constexpr auto rms_norm = spindle_rms_norm_bf16;
    static constexpr auto silu_and_mul = spindle_silu_and_mul_bf16;
    static constexpr auto rotary = spindle_rotary_bf16;
    static constexpr auto decode_attention = spindle_decode_attention_bf16;
    static bool linear_int4(const T* x, const uint8_t* packed, T* out, int64_t rows, int64_t out_features,
                            int64_t in_features, int threads) {
        return spindle_linear_int4_bf16(x, packed, out, rows, out_features, in_features, threads, true);
    }
};
struct F32Kernels {
    using T = float;
    static constexpr auto rms_norm = spindle_rms_norm_f32;
    static constexpr auto silu_and_mul = spindle_silu_and_mul_f32;
    static constexpr auto rotary = spindle_rotary_f32;
    static constexpr auto decode_attention = spindle_decode_attention_f32;
    static constexpr auto linear_int4 = spindle_linear_int4_f32;
};
// fp32 activations, quantized to int8 inside each projection (cpu_linear_q8.cpp)
struct Q8Kernels : F32Kernels {
    static constexpr auto linear_int4 = spindle_linear_int4_q8;
};

template <typename Kernels>
bool decode_layers(const int64_t* layer_table, const SpindleDecoderShape* shape, const SpindleDecodeBatch* batch,
                   const void* final_norm, typename Kernels::T* residual, typename Kernels::T* out,
                   const typename Kernels::T* cos, const typename Kernels::T* sin, const int64_t* slots,
                   int64_t rows, int threads) {
    using T = typename Kernels::T;
    const int64_t hidden = shape->hidden, head_dim = shape->head_dim, q_size = shape->heads * head_dim;
    const int64_t kv_size = shape->kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    const int hidden_int = static_cast<int>(hidden);
    std::vector<T> normed(rows * hidden), qkv(rows * qkv_size), query(rows * q_size), key(rows * kv_size),
        attended(rows * q_size), gate_up(rows * 2 * shape->intermediate), activated(rows * shape->intermediate),
        sublayer(rows * hidden);
    for (int64_t index = 0; index < shape->layers; ++index) {
        const int64_t* layer = layer_table + index * kLayerFields;
        // The first layer normalises the embeddings themselves; each later one adds the MLP output before it.
        Kernels::rms_norm(index ? sublayer.data() : residual, index ? residual : nullptr, at<void>(layer, kInputNorm),
                          normed.data(), rows, hidden_int, shape->eps);
        Kernels::linear_int4(normed.data(), at<uint8_t>(layer, kQkv), qkv.data(), rows, qkv_size, hidden, threads);
        Kernels::rotary(qkv.data(), qkv_size, cos, sin, query.data(), key.data(), rows, static_cast<int>(shape->heads),
                        static_cast<int>(shape->kv_heads), static_cast<int>(head_dim));
        auto* key_cache = at<T>(layer, kKeyCache);
        auto* value_cache = at<T>(layer, kValueCache);
        for (int64_t row = 0; row < rows; ++row) {
            std::memcpy(key_cache + slots[row] * kv_size, key.data() + row * kv_size, kv_size * sizeof(T));
            std::memcpy(value_cache + slots[row] * kv_size, qkv.data() + row * qkv_size + q_size + kv_size,
                        kv_size * sizeof(T));
        }
        if (!Kernels::decode_attention(query.data(), key_cache, value_cache, batch->block_tables, batch->context_lens,
                                       batch->row_counts, attended.data(), static_cast<int>(batch->sequences),
                                       static_cast<int>(shape->heads), static_cast<int>(shape->kv_heads),
                                       static_cast<int>(head_dim), static_cast<int>(shape->block_size),
                                       static_cast<int>(batch->max_blocks), shape->scale, threads))
            return false;
        Kernels::linear_int4(attended.data(), at<uint8_t>(layer, kOutput), sublayer.data(), rows, hidden, q_size,
                             threads);
        Kernels::rms_norm(sublayer.data(), residual, at<void>(layer, kPostNorm), normed.data(), rows, hidden_int,
                          shape->eps);
        Kernels::linear_int4(normed.data(), at<uint8_t>(layer, kGateUp), gate_up.data(), rows,
                             2 * shape->intermediate, hidden, threads);
        Kernels::silu_and_mul(gate_up.data(), activated.data(), rows, static_cast<int>(shape->intermediate));
        Kernels::linear_int4(activated.data(), at<uint8_t>(layer, kDown), sublayer.data(), rows, hidden,
                             shape->intermediate, threads);
    }
    Kernels::rms_norm(sublayer.data(), residual, final_norm, out, rows, hidden_int, shape->eps);
    return true;
}

}  // namespace

// residual [rows, hidden]: the step's embeddings in, the residual stream before the final norm out; out [rows,
// hidden]: the final norm's output. cos and sin [rows, head_dim]; slots [rows]: each row's flat cache slot. False
// where the attention kernel has no instantiation for the head size. One entry per activation type; the weights are
// the 4-bit copies in that type's layout and the caches blocks of that type.
extern "C" bool spindle_decode_layers_bf16(const int64_t* layer_table, const SpindleDecoderShape* shape,
                                           const SpindleDecodeBatch* batch, const void* final_norm,
                                           uint16_t* residual, uint16_t* out, const uint16_t* cos,
                                           const uint16_t* sin, const int64_t* slots, int64_t rows, int threads) {
    return decode_layers<Bf16Kernels>(layer_table, shape, batch, final_norm, residual, out, cos, sin, slots, rows,
                                      threads);
}
extern "C" bool spindle_decode_layers_f32(const int64_t* layer_table, const SpindleDecoderShape* shape,
                                          const SpindleDecodeBatch* batch, const void* final_norm, float* residual,
                                          float* out, const float* cos, const float* sin, const int64_t* slots,
                                          int64_t rows, int threads) {
    return decode_layers<F32Kernels>(layer_table, shape, batch, final_norm, residual, out, cos, sin, slots, rows,
                                     threads);
}
extern "C" bool spindle_decode_layers_q8(const int64_t* layer_table, const SpindleDecoderShape* shape,
                                         const SpindleDecodeBatch* batch, const void* final_norm, float* residual,
                                         float* out, const float* cos, const float* sin, const int64_t* slots,
                                         int64_t rows, int threads) {
    return decode_layers<Q8Kernels>(layer_table, shape, batch, final_norm, residual, out, cos, sin, slots, rows,
                                    threads);
}
