// Checks the native kernels' portable entry points against double-precision references computed here, for a CPU
// whose Python stack cannot run on this machine (an ARM64 build under qemu-user, tests/test_native_ports.py).
// Prints one line per failed check and exits non-zero if any failed.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C" {
void spindle_pack_int4_f32(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums, uint8_t* packed,
                           int64_t out_features, int64_t in_features);
bool spindle_linear_int4_f32(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
                             int64_t in_features, int threads);
void spindle_pack_int4_q8(const uint8_t* levels, const uint16_t* scales, const uint16_t* minimums, uint8_t* packed,
                          int64_t out_features, int64_t in_features);
bool spindle_linear_int4_q8(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
                            int64_t in_features, int threads);
void spindle_pack_int8_f32(const int8_t* values, const uint16_t* scales, uint8_t* packed, int64_t out_features,
                           int64_t in_features);
bool spindle_linear_int8_f32(const float* x, const uint8_t* packed, float* out, int64_t rows, int64_t out_features,
                             int64_t in_features, int threads);
void spindle_rms_norm_f32(const void* input, void* residual, const void* weight, void* out, int64_t rows, int hidden,
                          float eps);
void spindle_silu_and_mul_f32(const void* gate_up, void* out, int64_t rows, int width);
bool spindle_decode_attention_f32(const void* query, const void* key_cache, const void* value_cache,
                                  const int32_t* block_tables, const int32_t* context_lens, const int32_t* row_counts,
                                  void* output, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                  int block_size, int max_blocks, float scale, int num_threads);
}

namespace {

int failures = 0;
std::mt19937 random_engine(7);

void check(bool ok, const char* what, double got, double expected) {
    if (!ok) {
        ++failures;
        std::printf("FAILED %s: got %.9g, expected %.9g\n", what, got, expected);
    }
}

std::vector<float> normal(size_t n) {
    std::normal_distribution<float> distribution;
    std::vector<float> values(n);
    for (auto& value : values) value = distribution(random_engine);
    return values;
}

// fp16 bits of a value that fp16 holds exactly (scales here are multiples of 2^-10 below 1).
uint16_t half_bits(float value) {
    const int mantissa = static_cast<int>(std::lround(value * 1024));  // value = mantissa * 2^-10, |mantissa| < 1024
    if (mantissa == 0) return 0;
    int exponent = -10, magnitude = std::abs(mantissa);
    while (magnitude < 1024) magnitude <<= 1, --exponent;
    const uint16_t sign = mantissa < 0 ? 0x8000 : 0;
    return static_cast<uint16_t>(sign | (exponent + 15 + 10) << 10 | (magnitude & 0x3FF));
}

void check_linear(int rows, int out_features, int in_features) {
    const int groups = in_features / 32;
    std::uniform_int_distribution<int> level(0, 15), value(-127, 127), step(1, 100);
    std::vector<uint8_t> levels(out_features * in_features);
    std::vector<int8_t> values(out_features * in_features);
    std::vector<uint16_t> scales(out_features * groups), minimums(out_features * groups);
    std::vector<double> scale(out_features * groups), minimum(out_features * groups);
    for (int i = 0; i < out_features * groups; ++i) {
        scale[i] = step(random_engine) / 1024.0, minimum[i] = -step(random_engine) / 1024.0;
        scales[i] = half_bits(static_cast<float>(scale[i])), minimums[i] = half_bits(static_cast<float>(minimum[i]));
    }
    for (auto& l : levels) l = static_cast<uint8_t>(level(random_engine));
    for (auto& v : values) v = static_cast<int8_t>(value(random_engine));
    std::vector<uint8_t> packed4(out_features * in_features * 5 / 8), packed8(out_features * in_features * 17 / 16);
    spindle_pack_int4_f32(levels.data(), scales.data(), minimums.data(), packed4.data(), out_features, in_features);
    spindle_pack_int8_f32(values.data(), scales.data(), packed8.data(), out_features, in_features);
    std::vector<uint8_t> packed_q8(packed4.size());
    spindle_pack_int4_q8(levels.data(), scales.data(), minimums.data(), packed_q8.data(), out_features, in_features);
    const std::vector<float> x = normal(rows * in_features);
    // Integers up to 127 with 127 in every group of 32 are their own int8 quantization: the int8-activation kernel's
    // result is then the exact product too.
    std::vector<float> grid(rows * in_features);
    for (int i = 0; i < rows * in_features; ++i) grid[i] = i % 32 ? static_cast<float>(value(random_engine)) : 127.0f;
    std::vector<float> out4(rows * out_features), out8(rows * out_features), out_q8(rows * out_features);
    spindle_linear_int4_f32(x.data(), packed4.data(), out4.data(), rows, out_features, in_features, 2);
    spindle_linear_int8_f32(x.data(), packed8.data(), out8.data(), rows, out_features, in_features, 2);
    spindle_linear_int4_q8(grid.data(), packed_q8.data(), out_q8.data(), rows, out_features, in_features, 2);
    for (int r = 0; r < rows; ++r)
        for (int n = 0; n < out_features; ++n) {
            double sum4 = 0, sum8 = 0, sum_q8 = 0, magnitude4 = 0, magnitude8 = 0, magnitude_q8 = 0;
            for (int k = 0; k < in_features; ++k) {
                const int g = n * groups + k / 32;
                const double w4 = levels[n * in_features + k] * scale[g] + minimum[g];
                const double w8 = values[n * in_features + k] * scale[g];
                const double xk = x[r * in_features + k], gk = grid[r * in_features + k];
                sum4 += xk * w4, sum8 += xk * w8, magnitude4 += std::fabs(xk * w4), magnitude8 += std::fabs(xk * w8);
                sum_q8 += gk * w4, magnitude_q8 += std::fabs(gk * w4);
            }
            const double got4 = out4[r * out_features + n], got8 = out8[r * out_features + n];
            const double got_q8 = out_q8[r * out_features + n];
            check(std::fabs(got4 - sum4) <= magnitude4 * 1e-6, "linear_int4_f32", got4, sum4);
            check(std::fabs(got8 - sum8) <= magnitude8 * 1e-6, "linear_int8_f32", got8, sum8);
            check(std::fabs(got_q8 - sum_q8) <= magnitude_q8 * 1e-6, "linear_int4_q8", got_q8, sum_q8);
        }
}

void check_layer_ops(int rows, int hidden) {
    const std::vector<float> x = normal(rows * hidden), weight = normal(hidden), gate_up = normal(rows * 2 * hidden);
    std::vector<float> normed(rows * hidden), activated(rows * hidden);
    spindle_rms_norm_f32(x.data(), nullptr, weight.data(), normed.data(), rows, hidden, 1e-5f);
    spindle_silu_and_mul_f32(gate_up.data(), activated.data(), rows, hidden);
    for (int r = 0; r < rows; ++r) {
        double squares = 0;
        for (int i = 0; i < hidden; ++i) squares += double(x[r * hidden + i]) * x[r * hidden + i];
        const double inverse = 1 / std::sqrt(squares / hidden + 1e-5);
        for (int i = 0; i < hidden; ++i) {
            const double expected = weight[i] * (x[r * hidden + i] * inverse);
            check(std::fabs(normed[r * hidden + i] - expected) <= 1e-5 * (1 + std::fabs(expected)), "rms_norm_f32",
                  normed[r * hidden + i], expected);
            const double gate = gate_up[r * 2 * hidden + i], up = gate_up[r * 2 * hidden + hidden + i];
            const double silu = gate / (1 + std::exp(-gate)) * up;
            check(std::fabs(activated[r * hidden + i] - silu) <= 1e-5 * (1 + std::fabs(silu)), "silu_and_mul_f32",
                  activated[r * hidden + i], silu);
        }
    }
}

// Two sequences of 37 and 300 tokens over shuffled 16-token blocks, grouped-query heads, one and three query rows.
void check_decode_attention(int head_dim) {
    const int heads = 6, kv_heads = 2, block_size = 16, blocks = 24, max_blocks = 19;
    const int lengths[2] = {37, 300}, row_counts[2] = {1, 3};
    const std::vector<float> keys = normal(blocks * block_size * kv_heads * head_dim);
    const std::vector<float> values = normal(keys.size());
    std::vector<int32_t> tables(2 * max_blocks, 0);
    std::vector<int> order(blocks);
    for (int i = 0; i < blocks; ++i) order[i] = (i * 7) % blocks;
    for (int i = 0; i < 3; ++i) tables[i] = order[i];
    for (int i = 0; i < max_blocks; ++i) tables[max_blocks + i] = order[(3 + i) % blocks];
    const std::vector<float> query = normal(4 * heads * head_dim);
    std::vector<float> out(query.size());
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    spindle_decode_attention_f32(query.data(), keys.data(), values.data(), tables.data(), lengths, row_counts,
                                 out.data(), 2, heads, kv_heads, head_dim, block_size, max_blocks, scale, 2);
    int row = 0;
    for (int s = 0; s < 2; ++s)
        for (int r = 0; r < row_counts[s]; ++r, ++row) {
            const int seen = lengths[s] - (row_counts[s] - 1 - r);
            for (int h = 0; h < heads; ++h) {
                const int kv = h / (heads / kv_heads);
                std::vector<double> scores(seen);
                double peak = -INFINITY, total = 0;
                auto at = [&](const std::vector<float>& cache, int t, int d) {
                    const int block = tables[s * max_blocks + t / block_size];
                    return double(cache[((block * block_size + t % block_size) * kv_heads + kv) * head_dim + d]);
                };
                for (int t = 0; t < seen; ++t) {
                    double dot = 0;
                    for (int d = 0; d < head_dim; ++d) dot += query[(row * heads + h) * head_dim + d] * at(keys, t, d);
                    scores[t] = dot * scale, peak = std::max(peak, scores[t]);
                }
                for (auto& score : scores) total += score = std::exp(score - peak);
                for (int d = 0; d < head_dim; ++d) {
                    double expected = 0;
                    for (int t = 0; t < seen; ++t) expected += scores[t] / total * at(values, t, d);
                    const double got = out[(row * heads + h) * head_dim + d];
                    check(std::fabs(got - expected) <= 1e-5, "decode_attention_f32", got, expected);
                }
            }
        }
}

}  // namespace

int main() {
    for (int rows : {1, 2, 3, 4, 5, 9}) check_linear(rows, 48, 96);
    check_linear(17, 32, 32);
    check_layer_ops(3, 72);
    for (int head_dim : {64, 128}) check_decode_attention(head_dim);
    std::printf(failures ? "%d checks failed\n" : "all checks passed\n", failures);
    return failures ? 1 : 0;
}
