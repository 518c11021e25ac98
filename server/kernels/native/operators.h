// The server's C++ operators, written once over a back end's primitives.
//
// Each back end (avx512.cpp, avx2.cpp, portable.cpp: one file each) defines, before including this
// file, ASR_NATIVE_LIB (the torch.ops namespace it registers: asr_avx512, asr_avx2, asr_portable)
// and a namespace `simd` with:
//
//   bool cpu_supported();                      the CPU runs this back end's instructions
//   int64_t int8_weight_max();                 largest |int8 weight| Int8Tiles sums exactly (127, or 63
//                                              where u8 x s8 pairs are summed in 16 bits)
//   void quantize_rows_u8(x, q, s, begin, end, k)
//   float dot(a, b, n); void dot4(a, b[4], n, out)       (n a multiple of 8)
//   void exp_shifted(p, padded, top)           p[j] = e^(p[j] - top), padded a multiple of 8
//   void weighted_sum_any(p, values, n, offset, width, inv, o)
//   struct F32Tiles, Int8Tiles { kRows, kBlocks: the register tile, rows x 16-output blocks (1..6 x 1..4);
//                                template <int R, int NB> static void tile(...); }
//   void int8_epilogue(acc, colsum, w_scale, bias, row_scale, out, m)
//
// Operators (torch.ops.<ASR_NATIVE_LIB>.*; server/kernels/native/__init__.py loads one back end):
//
// rowwise_quantize_u8(rows (n, k) float32, padded_rows) -> (quantised (padded_rows, k) uint8, scale (n, 1)
// float32): server.kernels.linear.RowwiseInt8Linear's activation quantisation (each row its own scale
// max|row| / 127, clamped at 1e-12 / 127; round half to even; + 128) in one pass, padding rows 128.
//
// rowwise_int8(rows (n, k) float32, weight (blocks, k4, 16, 4) int8, colsum (blocks * 16,) int32,
// w_scale (out,) float32, bias (out,)?, out_features) -> (n, out) float32: RowwiseInt8Linear's
// product: exact int32 products of the quantised rows and weights, then (acc - 128 colsum) * w_scale,
// then fma with the row scale and the bias: the bits of the composed torch path. Each row's result
// depends on that row alone. weight[b, j, c, i] = w[16 b + c, 4 j + i], zero-padded.
//
// linear_f32(rows (n, k) float32, weight (blocks, k, 16) float32, bias (out,)?, out_features) -> (n, out):
// rows @ w.T + bias, weight[b, j, c] = w[16 b + c, j]: every output one multiply-add chain over
// j = 0 .. k-1 in order, then + bias, so a row's bits never depend on the other rows.
//
// ring_attention, predictor_step, emformer_layers: see there.
//
// Parallel loops use at::parallel_for (torch's own OpenMP runtime). Only torch's public extension
// headers are used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#ifndef ASR_NATIVE_LIB
#error "define ASR_NATIVE_LIB (the back end's torch.ops namespace) before including operators.h"
#endif

namespace {

constexpr int64_t kBlock = 16;  // outputs of one weight block

void check_cpu() { TORCH_CHECK(simd::cpu_supported(), "this CPU lacks the instructions of this kernel back end"); }

std::tuple<at::Tensor, at::Tensor> rowwise_quantize_u8(const at::Tensor& rows_in, int64_t padded_rows) {
  check_cpu();
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1);
  TORCH_CHECK(padded_rows >= n, "padded_rows must be at least the number of rows");
  at::Tensor quantised = at::empty({padded_rows, k}, rows.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n, 1}, rows.options());
  const float* x = rows.data_ptr<float>();
  uint8_t* q = quantised.data_ptr<uint8_t>();
  float* s = scale.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    simd::quantize_rows_u8(x, q, s, begin, end, k);
  });
  if (padded_rows > n) std::memset(q + n * k, 128, static_cast<size_t>((padded_rows - n) * k));
  return {quantised, scale};
}

int64_t int8_weight_max() { return simd::int8_weight_max(); }

// ---- attention over the left-context ring, read in place ----

// One stream's attention: for each head and query row, softmax(scale * q.k) over its valid ring
// keys and the chunk's own keys, times the values.
// Batch rows: row r of group b is at k + b * kv_group + r * kv_row (v alike).
struct BatchRows {
  const float* k;
  const float* v;
  int64_t kv_group, kv_row, rows;
};

void ring_attention_stream(const float* q, int64_t q_row, const BatchRows& batch, int64_t group,
                           const float* ring_k, const float* ring_v, int64_t ring_row, const bool* valid,
                           const int64_t* carried, int64_t ring, int64_t heads, int64_t head_dim, float scale,
                           float* out, int64_t out_row) {
  std::vector<const float*> keys, values;
  const int64_t rows = batch.rows;
  auto push_row = [&](int64_t flat) {  // row flat = g * rows + r of the batch's own keys
    const int64_t at = (flat / rows) * batch.kv_group + (flat % rows) * batch.kv_row;
    keys.push_back(batch.k + at);
    values.push_back(batch.v + at);
  };
  for (int64_t j = 0; j < ring; ++j) {
    if (!valid[j]) continue;
    if (carried != nullptr && carried[j] >= 0) {  // an earlier chunk of this stream, in this step
      push_row(carried[j]);
    } else {
      keys.push_back(ring_k + j * ring_row);
      values.push_back(ring_v + j * ring_row);
    }
  }
  for (int64_t r = 0; r < rows; ++r) push_row(group * rows + r);
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<float> p((n + 7) / 8 * 8);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t offset = h * head_dim;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * q_row + offset;
      float top = -INFINITY;
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const float* four[4] = {keys[j] + offset, keys[j + 1] + offset, keys[j + 2] + offset, keys[j + 3] + offset};
        simd::dot4(qr, four, head_dim, &p[j]);
      }
      for (; j < n; ++j) p[j] = simd::dot(qr, keys[j] + offset, head_dim);
      for (j = 0; j < n; ++j) {
        p[j] *= scale;
        top = p[j] > top ? p[j] : top;
      }
      for (int64_t j = n; j < static_cast<int64_t>(p.size()); ++j) p[j] = -INFINITY;
      simd::exp_shifted(p.data(), static_cast<int64_t>(p.size()), top);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += p[j];  // not the padding lanes
      const float inv = 1.0f / sum;
      simd::weighted_sum_any(p.data(), values.data(), n, offset, head_dim, inv, out + r * out_row + offset);
    }
  }
}

// ring_attention(q, k, v (B, rows, D) float32, last dim contiguous; ring_kv (slots, 2, ring + rows, D):
// one layer of server.encoder.LeftContextPool.kv, read in place; slots (B,) long; valid (B, ring)
// bool; carried (B, ring) long or None: where >= 0, the ring entry is row carried[b, j] = g * rows + r
// of this batch's own k / v (an earlier chunk of the same stream in this step); heads; scale) ->
// (B, rows, D): StreamingEncoder's attention without the per-layer gather of the batch's ring (each
// group's keys are its valid ring entries, then its chunk's own rows). Groups run in parallel; each
// group's result depends on its own inputs alone.
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ring_kv,
                          const at::Tensor& slots_in, const at::Tensor& valid_in,
                          const std::optional<at::Tensor>& carried_in, int64_t heads, double scale) {
  check_cpu();
  for (const at::Tensor* t : {&q, &k, &v, &ring_kv})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(-1) == 1, "float32 tensors, last dimension contiguous");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must be (B, rows, D)");
  TORCH_CHECK(k.stride(1) == v.stride(1) && k.stride(0) == v.stride(0), "k and v must share their strides");
  const int64_t B = q.size(0), rows = q.size(1), D = q.size(2);
  TORCH_CHECK(ring_kv.dim() == 4 && ring_kv.size(1) == 2 && ring_kv.size(3) == D, "ring_kv must be (slots, 2, P, D)");
  TORCH_CHECK(heads > 0 && D % heads == 0 && (D / heads) % 8 == 0, "head width must be a multiple of 8");
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const at::Tensor valid = valid_in.to(at::kBool).contiguous();
  TORCH_CHECK(slots.numel() == B && valid.dim() == 2 && valid.size(0) == B, "slots (B,), valid (B, ring)");
  const int64_t ring = valid.size(1);
  TORCH_CHECK(ring <= ring_kv.size(2), "valid has more ring entries than ring_kv");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slot[b] >= 0 && slot[b] < ring_kv.size(0), "slot out of range");
  at::Tensor carried;
  if (carried_in.has_value()) {
    carried = carried_in->to(at::kLong).contiguous();
    TORCH_CHECK(carried.sizes() == valid.sizes(), "carried must be (B, ring) like valid");
    TORCH_CHECK(carried.numel() == 0 || carried.max().item<int64_t>() < B * rows, "carried row out of range");
  }
  at::Tensor out = at::empty({B, rows, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const BatchRows batch{k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0), k.stride(1), rows};
  const float* pool = ring_kv.data_ptr<float>();
  const bool* mask = valid.data_ptr<bool>();
  const int64_t* from = carried.defined() ? carried.data_ptr<int64_t>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* stream_ring = pool + slot[b] * ring_kv.stride(0);
      ring_attention_stream(qp + b * q.stride(0), q.stride(1), batch, b, stream_ring, stream_ring + ring_kv.stride(1),
                            ring_kv.stride(2), mask + b * ring, from == nullptr ? nullptr : from + b * ring, ring,
                            heads, D / heads, static_cast<float>(scale), op + b * rows * D, D);
    }
  });
  return out;
}

// ---- register-tiled products, weights read once per call for few rows ----

// The register tile of kernel K for `rows` (1..6) rows and `nb` (1..4) blocks.
template <class K, int R>
auto tile_for_rows(int nb) {
  switch (nb) {
    case 1: return &K::template tile<R, 1>;
    case 2: return &K::template tile<R, 2>;
    case 3: return &K::template tile<R, 3>;
    default: return &K::template tile<R, 4>;
  }
}

template <class K>
auto tile_for(int rows, int nb) {
  switch (rows) {
    case 1: return tile_for_rows<K, 1>(nb);
    case 2: return tile_for_rows<K, 2>(nb);
    case 3: return tile_for_rows<K, 3>(nb);
    case 4: return tile_for_rows<K, 4>(nb);
    case 5: return tile_for_rows<K, 5>(nb);
    default: return tile_for_rows<K, 6>(nb);
  }
}

// The schedule of kernel K: tasks of K::kBlocks 16-output blocks (their weights read from memory
// once, for all rows) in parallel, each running its row tiles of K::kRows rows in turn.
// body(scratch, first block, blocks, first output column, columns, first row, rows) computes one
// tile; scratch holds a tile's accumulators (row stride 16 * K::kBlocks).
template <class K, class Acc, class Body>
void for_each_tile(int64_t n, int64_t blocks, int64_t m, const Body& body) {
  constexpr int rows_per_tile = K::kRows, blocks_per_tile = K::kBlocks;
  static_assert(rows_per_tile >= 1 && rows_per_tile <= 6 && blocks_per_tile >= 1 && blocks_per_tile <= 4,
                "register tiles are 1..6 rows by 1..4 blocks");
  const int64_t groups = (blocks + blocks_per_tile - 1) / blocks_per_tile;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) Acc scratch[rows_per_tile * kBlock * blocks_per_tile];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * blocks_per_tile;
      const int nb = static_cast<int>(std::min<int64_t>(blocks_per_tile, blocks - first));
      const int64_t col = kBlock * first, cols = std::min<int64_t>(kBlock * nb, m - col);
      for (int64_t r0 = 0; r0 < n; r0 += rows_per_tile)
        body(scratch, first, nb, col, cols, r0, static_cast<int>(std::min<int64_t>(rows_per_tile, n - r0)));
    }
  });
}

std::optional<at::Tensor> checked_bias(const std::optional<at::Tensor>& bias_in, int64_t m) {
  if (!bias_in.has_value()) return std::nullopt;
  at::Tensor bias = bias_in->contiguous();
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == m, "bias must be (", m, ",) float32");
  return bias;
}

at::Tensor rowwise_int8(const at::Tensor& rows_in, const at::Tensor& weight, const at::Tensor& colsum,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias_in, int64_t out_features) {
  check_cpu();
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kChar && weight.size(2) == kBlock &&
                  weight.size(3) == 4 && weight.is_contiguous(),
              "weight must be (blocks, k4, 16, 4) int8, contiguous");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1), blocks = weight.size(0), k4 = weight.size(1);
  const int64_t m = out_features;
  TORCH_CHECK(k4 == (k + 3) / 4, "rows have ", k, " columns, the weights ", 4 * k4);
  TORCH_CHECK(m > 0 && m <= kBlock * blocks && kBlock * blocks < m + kBlock,
              "out_features does not match the weight blocks");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.numel() == kBlock * blocks,
              "colsum must be (blocks * 16,) int32");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == m,
              "w_scale must be (out,) float32");
  const std::optional<at::Tensor> bias = checked_bias(bias_in, m);
  const int64_t kp = 4 * k4;
  at::Tensor quantised = at::empty({n, kp}, rows.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n}, rows.options());
  const float* x = rows.data_ptr<float>();
  uint8_t* q = quantised.data_ptr<uint8_t>();
  float* s = scale.data_ptr<float>();
  if (kp == k) {
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
      simd::quantize_rows_u8(x, q, s, begin, end, k);
    });
  } else {  // padding columns: any value (their weights are zero); 128 keeps them zero anyway
    std::vector<uint8_t> row(k);
    for (int64_t i = 0; i < n; ++i) {
      simd::quantize_rows_u8(x + i * k, row.data(), s + i, 0, 1, k);
      std::memcpy(q + i * kp, row.data(), k);
      std::memset(q + i * kp + k, 128, kp - k);
    }
  }
  at::Tensor out = at::empty({n, m}, rows.options());
  float* o = out.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int32_t* cs = colsum.data_ptr<int32_t>();
  const float* ws = w_scale.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  using Tiles = simd::Int8Tiles;
  for_each_tile<Tiles, int32_t>(n, blocks, m, [&](int32_t* acc, int64_t first, int nb, int64_t col, int64_t cols,
                                                  int64_t r0, int rr) {
    tile_for<Tiles>(rr, nb)(q + r0 * kp, kp, wp + first * k4 * 4 * kBlock, k4, acc, kBlock * Tiles::kBlocks);
    for (int r = 0; r < rr; ++r)
      simd::int8_epilogue(acc + r * kBlock * Tiles::kBlocks, cs + col, ws + col, b == nullptr ? nullptr : b + col,
                          s[r0 + r], o + (r0 + r) * m + col, cols);
  });
  return out;
}

at::Tensor linear_f32(const at::Tensor& rows_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                      int64_t out_features) {
  check_cpu();
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kFloat && weight.size(2) == kBlock &&
                  weight.is_contiguous(),
              "weight must be (blocks, k, 16) float32, contiguous");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1), blocks = weight.size(0), m = out_features;
  TORCH_CHECK(weight.size(1) == k, "rows have ", k, " columns, the weights ", weight.size(1));
  TORCH_CHECK(m > 0 && m <= kBlock * blocks && kBlock * blocks < m + kBlock,
              "out_features does not match the weight blocks");
  const std::optional<at::Tensor> bias = checked_bias(bias_in, m);
  at::Tensor out = at::empty({n, m}, rows.options());
  const float* x = rows.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  using Tiles = simd::F32Tiles;
  for_each_tile<Tiles, float>(n, blocks, m, [&](float* tile, int64_t first, int nb, int64_t col, int64_t cols,
                                                int64_t r0, int rr) {
    tile_for<Tiles>(rr, nb)(x + r0 * k, k, wp + first * k * kBlock, k, tile, kBlock * Tiles::kBlocks);
    for (int r = 0; r < rr; ++r) {
      const float* t = tile + r * kBlock * Tiles::kBlocks;
      float* oi = o + (r0 + r) * m + col;
      if (b != nullptr) {
        for (int64_t j = 0; j < cols; ++j) oi[j] = t[j] + b[col + j];
      } else {
        std::memcpy(oi, t, cols * sizeof(float));
      }
    }
  });
  return out;
}

// ---- one step of torchaudio's RNN-T prediction network, in one call ----
//
// predictor_step(tokens (n,) int64, embedding (V, D) float32, linears, linear_kind, out_features,
// norms, eps, state, rows?) -> (output (n, E), new state): torchaudio's _Predictor for one symbol per
// row (embedding, input layer norm, L _CustomLSTM layers, linear, output layer norm), the same
// operators in the same order as the Python modules (so the same bits), without the ~220
// dispatched calls and Python frames of the module path. Products run on this back end's kernels:
// linear_kind 0 = linear_f32 (each linear [weight, bias]), 1 = rowwise_int8 ([weight, colsum,
// w_scale, bias]); a 0-element bias is none. Linears in order x2g, p2g per layer, then the output
// linear; out_features per linear. norms: (weight, bias) pairs, input norm, then per layer the gate
// and cell norms when there are 2 + 4 L + 2 of them (torchaudio's lstm_layer_norm), then the output
// norm; eps: input, LSTM, output. state: h, c per layer. With rows (n,) int64, state holds every
// stream (B, H): the step reads rows' states and writes their new ones in place (returned too);
// without, state is (n, H) and is left as it is.

// The fused operators call the kernels directly (no dispatch); RECORD_FUNCTION names them to
// torch.profiler as if dispatched (bench/step_profile.py counts products by name), at no cost
// when no profiler runs.
at::Tensor apply_linear(const std::vector<at::Tensor>& t, int64_t kind, int64_t out_features, const at::Tensor& x) {
  RECORD_FUNCTION(kind == 0 ? "asr_native::linear_f32" : "asr_native::rowwise_int8", std::vector<c10::IValue>());
  if (kind == 0) {
    std::optional<at::Tensor> bias;
    if (t[1].numel() > 0) bias = t[1];
    return linear_f32(x, t[0], bias, out_features);
  }
  std::optional<at::Tensor> bias;
  if (t[3].numel() > 0) bias = t[3];
  return rowwise_int8(x, t[0], t[1], t[2], bias, out_features);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> predictor_step(
    const at::Tensor& tokens, const at::Tensor& embedding, const std::vector<at::Tensor>& linears,
    int64_t linear_kind, const std::vector<int64_t>& out_features, const std::vector<at::Tensor>& norms,
    const std::vector<double>& eps, const std::vector<at::Tensor>& state, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(linear_kind == 0 || linear_kind == 1, "linear_kind must be 0 (fp32) or 1 (int8)");
  const size_t per = linear_kind == 0 ? 2 : 4;
  const int64_t layers = static_cast<int64_t>(state.size()) / 2;
  TORCH_CHECK(layers >= 1 && state.size() == static_cast<size_t>(2 * layers), "state must be h, c per layer");
  TORCH_CHECK(linears.size() == per * (2 * layers + 1) && out_features.size() == static_cast<size_t>(2 * layers + 1),
              "linears must be x2g, p2g per layer and the output linear");
  const bool lstm_norm = norms.size() == static_cast<size_t>(2 + 4 * layers + 2);
  TORCH_CHECK(lstm_norm || norms.size() == 4, "norms: input, [gate, cell per layer,] output (weight, bias) pairs");
  TORCH_CHECK(eps.size() == 3, "eps: input, LSTM, output");
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "tokens must be (n,) int64");
  auto linear = [&](int64_t index, const at::Tensor& x) {
    const std::vector<at::Tensor> t(linears.begin() + index * per, linears.begin() + (index + 1) * per);
    return apply_linear(t, linear_kind, out_features[index], x);
  };
  auto norm = [&](int64_t pair, const at::Tensor& x, double e) {
    const at::Tensor& w = norms[2 * pair];
    return at::layer_norm(x, {w.size(0)}, w, norms[2 * pair + 1], e);
  };
  at::Tensor x = norm(0, at::embedding(embedding, tokens), eps[0]);
  std::vector<at::Tensor> new_state;
  new_state.reserve(state.size());
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor h = rows.has_value() ? state[2 * l].index_select(0, *rows) : state[2 * l];
    at::Tensor c = rows.has_value() ? state[2 * l + 1].index_select(0, *rows) : state[2 * l + 1];
    at::Tensor gates = at::add(linear(2 * l, x), linear(2 * l + 1, h));
    if (lstm_norm) gates = norm(1 + 2 * l, gates, eps[1]);
    const auto g = gates.chunk(4, 1);
    const at::Tensor input_gate = g[0].sigmoid(), forget_gate = g[1].sigmoid(), cell_gate = g[2].tanh(),
                     output_gate = g[3].sigmoid();
    c = at::add(at::mul(forget_gate, c), at::mul(input_gate, cell_gate));
    if (lstm_norm) c = norm(2 + 2 * l, c, eps[1]);
    h = at::mul(output_gate, c.tanh());
    if (rows.has_value()) {
      state[2 * l].index_copy_(0, *rows, h);
      state[2 * l + 1].index_copy_(0, *rows, c);
    }
    new_state.push_back(h);
    new_state.push_back(c);
    x = h;
  }
  const int64_t last = static_cast<int64_t>(norms.size()) / 2 - 1;
  return {norm(last, linear(2 * layers, x), eps[2]), new_state};
}

// ---- every Emformer layer of one encoder step, in one call ----
//
// emformer_layers(x (B, rows, D) float32, linears, linear_kind, out_features, norms, eps, activation,
// ring_kv (slots, L, 2, P, D): LeftContextPool.kv, read in place; slots, valid, carried?, heads, scale)
// -> (x after the L layers (B, rows, D), segments (B, L, 2, 4, D)): the loop of
// server.encoder.StreamingEncoder.forward over its StreamingLayers with the in-place ring attention,
// the same operators in the same order (so the same bits), without the ~60 dispatched calls and
// the Python frames per layer. Per layer: linears qkv, out, ff1, ff2 (linear_kind and tensors as in
// predictor_step), norms ln_in, ln_ff, ln_out (weight, bias pairs, eps each); activation 0 relu,
// 1 gelu, 2 silu. segments[:, l] are the layer's keys and values of the chunk's segment rows (the
// rows after the first rows - 4, the right context), for the caller to write into the ring.
std::tuple<at::Tensor, at::Tensor> emformer_layers(
    const at::Tensor& x_in, const std::vector<at::Tensor>& linears, int64_t linear_kind,
    const std::vector<int64_t>& out_features, const std::vector<at::Tensor>& norms, const std::vector<double>& eps,
    int64_t activation, const at::Tensor& ring_kv, const at::Tensor& slots, const at::Tensor& valid,
    const std::optional<at::Tensor>& carried, int64_t heads, double scale) {
  TORCH_CHECK(linear_kind == 0 || linear_kind == 1, "linear_kind must be 0 (fp32) or 1 (int8)");
  TORCH_CHECK(activation >= 0 && activation <= 2, "activation must be 0 (relu), 1 (gelu) or 2 (silu)");
  const size_t per = linear_kind == 0 ? 2 : 4;
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kFloat, "x must be (B, rows, D) float32");
  const int64_t layers = static_cast<int64_t>(out_features.size()) / 4;
  TORCH_CHECK(layers >= 1 && out_features.size() == static_cast<size_t>(4 * layers) &&
                  linears.size() == per * 4 * layers && norms.size() == static_cast<size_t>(6 * layers) &&
                  eps.size() == static_cast<size_t>(3 * layers),
              "per layer: 4 linears (qkv, out, ff1, ff2), 3 norms (in, ff, out) with their eps");
  TORCH_CHECK(ring_kv.dim() == 5 && ring_kv.size(1) == layers && ring_kv.size(2) == 2, "ring_kv must be (slots, L, 2, P, D)");
  const int64_t B = x_in.size(0), rows = x_in.size(1), D = x_in.size(2), segment = 4;
  TORCH_CHECK(rows > segment, "rows must be the right context and the 4 segment frames");
  const int64_t right = rows - segment;
  auto linear = [&](int64_t index, const at::Tensor& x) {
    const std::vector<at::Tensor> t(linears.begin() + index * per, linears.begin() + (index + 1) * per);
    const at::Tensor out = apply_linear(t, linear_kind, out_features[index], x.reshape({-1, x.size(-1)}));
    return out.reshape({B, rows, out_features[index]});
  };
  auto norm = [&](int64_t index, const at::Tensor& x) {
    const at::Tensor& w = norms[2 * index];
    return at::layer_norm(x, {w.size(0)}, w, norms[2 * index + 1], eps[index]);
  };
  at::Tensor segments = at::empty({B, layers, 2, segment, D}, x_in.options());
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor qkv = linear(4 * l, norm(3 * l, x));
    const auto parts = qkv.split(D, -1);
    const at::Tensor& q = parts[0];
    const at::Tensor& k = parts[1];
    const at::Tensor& v = parts[2];
    at::Tensor attn;
    {
      RECORD_FUNCTION("asr_native::ring_attention", std::vector<c10::IValue>());
      attn = ring_attention(q, k, v, ring_kv.select(1, l), slots, valid, carried, heads, scale);
    }
    segments.select(1, l).select(1, 0).copy_(k.narrow(1, right, segment));
    segments.select(1, l).select(1, 1).copy_(v.narrow(1, right, segment));
    x = at::add(linear(4 * l + 1, attn), x);
    at::Tensor hidden = linear(4 * l + 2, norm(3 * l + 1, x));
    hidden = activation == 0 ? at::relu(hidden) : activation == 1 ? at::gelu(hidden) : at::silu(hidden);
    x = norm(3 * l + 2, at::add(linear(4 * l + 3, hidden), x));
  }
  return {x, segments};
}
}  // namespace

// TORCH_LIBRARY pastes its namespace argument: expand ASR_NATIVE_LIB first
#define ASR_DEFINE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define ASR_IMPLEMENT_LIBRARY(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

ASR_DEFINE_LIBRARY(ASR_NATIVE_LIB, m) {
  m.def("int8_weight_max() -> int", &int8_weight_max);
  m.def("rowwise_quantize_u8(Tensor rows, int padded_rows) -> (Tensor, Tensor)");
  m.def("ring_attention(Tensor q, Tensor k, Tensor v, Tensor ring_kv, Tensor slots, Tensor valid, Tensor? carried, "
        "int heads, float scale) -> Tensor");
  m.def("rowwise_int8(Tensor rows, Tensor weight, Tensor colsum, Tensor w_scale, Tensor? bias, "
        "int out_features) -> Tensor");
  m.def("linear_f32(Tensor rows, Tensor weight, Tensor? bias, int out_features) -> Tensor");
  m.def("predictor_step(Tensor tokens, Tensor embedding, Tensor[] linears, int linear_kind, int[] out_features, "
        "Tensor[] norms, float[] eps, Tensor(a!)[] state, Tensor? rows) -> (Tensor, Tensor[])");
  m.def("emformer_layers(Tensor x, Tensor[] linears, int linear_kind, int[] out_features, Tensor[] norms, "
        "float[] eps, int activation, Tensor ring_kv, Tensor slots, Tensor valid, Tensor? carried, int heads, "
        "float scale) -> (Tensor, Tensor)");
}

ASR_IMPLEMENT_LIBRARY(ASR_NATIVE_LIB, m) {
  m.impl("rowwise_quantize_u8", &rowwise_quantize_u8);
  m.impl("ring_attention", &ring_attention);
  m.impl("rowwise_int8", &rowwise_int8);
  m.impl("linear_f32", &linear_f32);
  m.impl("predictor_step", &predictor_step);
  m.impl("emformer_layers", &emformer_layers);
}
