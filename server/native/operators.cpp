// The server's C++ operators (server/native/__init__.py builds and loads them).
//
// server.precision.RowwiseInt8Linear's int8 products, bit for bit the results of the composed
// torch path (each row quantised with its own scale max|row| / 127, clamped at 1e-12 / 127, to
// round(row / scale); exact int32 products; weight scale, row scale, bias), and
// server.encoder.StreamingEncoder's attention over the left-context pool (ring_attention, below).
//
// asr_native::rowwise_int8_gemm(rows (n, k) float32, packed fbgemm weights, bias (out,)?) ->
// (n, out) float32: the whole linear on fbgemm's int8 GEMM, called directly (one quantising pass,
// the GEMM with fbgemm's float output stage, one pass for row scale and bias), instead of about
// ten dispatched operators around quantized::linear_dynamic. Built with torch's fbgemm headers;
// asmjit_shim/ stands in for the asmjit headers they include and torch does not ship.
//
// asr_native::rowwise_quantize_u8(rows (n, k) float32, padded_rows) -> (quantised (padded_rows, k)
// uint8, scale (n, 1) float32): the large-product (oneDNN) path's activation quantisation in one
// pass instead of six: round(row / scale) + 128, the padding rows all 128 (zero).
//
// asr_native::rowwise_int8_vnni (AVX-512 VNNI) and asr_native::linear_f32 (AVX-512): register-tiled
// kernels for products of any row count that read each weight once per call (see there); the
// int8 one gives the other paths' bits, the fp32 one keeps each row independent of the batch.
// Their code is compiled for those instruction sets whatever the build flags; server/native
// offers them only where /proc/cpuinfo lists them (and they refuse to run otherwise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/native/quantized/PackedParams.h>
#include <ATen/native/quantized/cpu/fbgemm_utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

float row_abs_max(const float* x, int64_t k) {  // max |x_j| (AVX2: the build requires it)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j + 8)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = 0.f;
  for (float l : lanes) m = l > m ? l : m;
  for (; j < k; ++j) {
    const float a = std::fabs(x[j]);
    m = a > m ? a : m;
  }
  return m;
}

float row_scale(const float* x, int64_t k) {  // the row's int8 scale, max |x_j| / 127
  const float m = row_abs_max(x, k);
  return (m > 1e-12f ? m : 1e-12f) / 127.0f;
}

void quantize_rows_u8(const float* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s, int64_t begin,
                      int64_t end, int64_t k) {
  // round half to even (the composed path's torch.round), then + 128: exact on integers
  const __m256 offset = _mm256_set1_ps(128.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * k;
    const float si = row_scale(xi, k);
    s[i] = si;
    const __m256 sv = _mm256_set1_ps(si);
    uint8_t* qi = q + i * k;
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
      __m256i v[4];
      for (int p = 0; p < 4; ++p) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xi + j + 8 * p), sv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[p] = _mm256_cvtps_epi32(_mm256_add_ps(r, offset));
      }
      const __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_packus_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qi + j), _mm256_permutevar8x32_epi32(words, order));
    }
    for (; j < k; ++j) qi[j] = static_cast<uint8_t>(std::nearbyint(xi[j] / si) + 128.0f);
  }
}

std::tuple<at::Tensor, at::Tensor> rowwise_quantize_u8(const at::Tensor& rows_in, int64_t padded_rows) {
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
    quantize_rows_u8(x, q, s, begin, end, k);
  });
  if (padded_rows > n) std::memset(q + n * k, 128, static_cast<size_t>((padded_rows - n) * k));
  return {quantised, scale};
}

// The whole row-wise int8 linear on fbgemm's int8 GEMM, called directly: rows quantised to uint8
// around 128 (rowwise_quantize_u8's bits); fbgemm's float output stage gives each exact product
// times its weight scale (acc - 128 * colsum) * w_scale, as in linear_dynamic at unit activation
// scale; then out = fma(that, row_scale, bias), as torch's addcmul: the other paths' bits.
at::Tensor rowwise_int8_gemm(const at::Tensor& rows_in, const c10::intrusive_ptr<LinearPackedParamsBase>& packed,
                             const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  auto* weight = dynamic_cast<PackedLinearWeight*>(packed.get());
  TORCH_CHECK(weight != nullptr, "packed must be fbgemm's PackedLinearWeight");
  TORCH_CHECK(weight->q_scheme == c10::kPerChannelAffine, "weights must be quantised per channel");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1);
  const int64_t m = weight->w->numCols();
  TORCH_CHECK(weight->w->numRows() == k, "rows have ", k, " columns, the weights ", weight->w->numRows());
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == m, "bias must be (", m, ",) float32");
  }
  at::Tensor quantised = at::empty({n, k}, rows.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n}, rows.options());
  const float* x = rows.data_ptr<float>();
  uint8_t* q = quantised.data_ptr<uint8_t>();
  float* s = scale.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    quantize_rows_u8(x, q, s, begin, end, k);
  });
  at::Tensor out = at::empty({n, m}, rows.options());
  at::Tensor buffer = at::empty({n, m}, rows.options().dtype(at::kInt));
  float* o = out.data_ptr<float>();
  int32_t* acc = buffer.data_ptr<int32_t>();
  const int tasks = at::get_num_threads();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> row_offsets(fbgemm::PackAWithRowOffset<uint8_t>::rowOffsetBufferSize());
    for (int64_t task = begin; task < end; ++task) {
      fbgemm::PackAWithRowOffset<uint8_t> pack_a(fbgemm::matrix_op_t::NoTranspose, static_cast<uint32_t>(n),
                                                 static_cast<uint32_t>(k), q, static_cast<uint32_t>(k), nullptr, 1,
                                                 row_offsets.data());
      fbgemm::DoNothing<float, float> nothing;
      // weights are symmetric (zero point 0): no row-offset term
      fbgemm::ReQuantizeForFloat<false, fbgemm::QuantizationGranularity::OUT_CHANNEL> output(
          nothing, 1.0f, weight->w_scale.data(), 128, weight->w_zp.data(), nullptr, weight->col_offsets.data(),
          nullptr, static_cast<uint32_t>(m));
      fbgemm::fbgemmPacked(pack_a, *weight->w, o, acc, static_cast<int32_t>(m), output, static_cast<int>(task),
                           tasks);
    }
  });
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / m), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* oi = o + i * m;
      const float si = s[i];
      if (b != nullptr) {
        for (int64_t j = 0; j < m; ++j) oi[j] = std::fma(oi[j], si, b[j]);  // torch's addcmul fuses too
      } else {
        for (int64_t j = 0; j < m; ++j) oi[j] *= si;
      }
    }
  });
  return out;
}


// ---- attention over the left-context ring, read in place ----

__m256 exp_ps(__m256 x) {  // e^x, Cephes' single-precision polynomial (about 1 ulp), x <= 88
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

float hsum(__m256 v) {  // the 8 lanes summed (the order dot() has always used)
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

float dot(const float* a, const float* b, int64_t n) {  // n a multiple of 8
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i < n) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// dot(a, b[t], n) for t = 0 .. 3, each by exactly dot()'s operations in dot()'s order (the same
// bits), interleaved: eight independent fma chains instead of two.
void dot4(const float* a, const float* const* b, int64_t n, float* out) {
  __m256 acc0[4], acc1[4];
  for (int t = 0; t < 4; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      acc0[t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b[t] + i), acc0[t]);
      acc1[t] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b[t] + i + 8), acc1[t]);
    }
  }
  if (i < n) {
    const __m256 a0 = _mm256_loadu_ps(a + i);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) acc0[t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b[t] + i), acc0[t]);
  }
  for (int t = 0; t < 4; ++t) out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t]));
}

// o[0 .. 8C) = inv * sum_j p[j] values[j][offset + ...], each lane one fma chain over j in order;
// C chunks of 8 lanes advance together (independent chains: the fma latency is not the limit).
template <int C>
void weighted_sum(const float* p, const float* const* values, int64_t n, int64_t offset, float inv, float* o) {
  __m256 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    const float* v = values[j] + offset;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
  }
  const __m256 scale = _mm256_set1_ps(inv);
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_mul_ps(acc[c], scale));
}

void weighted_sum_any(const float* p, const float* const* values, int64_t n, int64_t offset, int64_t width,
                      float inv, float* o) {  // width a multiple of 8
  using Fn = void (*)(const float*, const float* const*, int64_t, int64_t, float, float*);
  static constexpr Fn by_chunks[] = {nullptr, &weighted_sum<1>, &weighted_sum<2>, &weighted_sum<3>,
                                     &weighted_sum<4>, &weighted_sum<5>, &weighted_sum<6>, &weighted_sum<7>,
                                     &weighted_sum<8>};
  for (int64_t d = 0; d < width; d += 64) {
    const int64_t chunks = std::min<int64_t>(8, (width - d) / 8);
    by_chunks[chunks](p, values, n, offset + d, inv, o + d);
  }
}

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
        dot4(qr, four, head_dim, &p[j]);
      }
      for (; j < n; ++j) p[j] = dot(qr, keys[j] + offset, head_dim);
      for (j = 0; j < n; ++j) {
        p[j] *= scale;
        top = p[j] > top ? p[j] : top;
      }
      for (int64_t j = n; j < static_cast<int64_t>(p.size()); ++j) p[j] = -INFINITY;
      const __m256 top_v = _mm256_set1_ps(top);
      for (size_t j = 0; j < p.size(); j += 8)
        _mm256_storeu_ps(&p[j], exp_ps(_mm256_sub_ps(_mm256_loadu_ps(&p[j]), top_v)));
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += p[j];  // not the padding lanes
      const float inv = 1.0f / sum;
      weighted_sum_any(p.data(), values.data(), n, offset, head_dim, inv, out + r * out_row + offset);
    }
  }
}

// asr_native::ring_attention(q, k, v (B, rows, D) float32, last dim contiguous; ring_kv (slots, 2,
// ring + rows, D): one layer of server.encoder.LeftContextPool.kv, read in place; slots (B,) long;
// valid (B, ring) bool; carried (B, ring) long or None: where >= 0, the ring entry is row
// carried[b, j] = g * rows + r of this batch's own k / v (an earlier chunk of the same stream in
// this step); heads; scale) -> (B, rows, D): StreamingEncoder's attention without the per-layer
// gather of the batch's ring (each group's keys are its valid ring entries, then its chunk's own
// rows). Groups run in parallel; each group's result depends on its own inputs alone.
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ring_kv,
                          const at::Tensor& slots_in, const at::Tensor& valid_in,
                          const std::optional<at::Tensor>& carried_in, int64_t heads, double scale) {
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



// ---- few-row int8 products on AVX-512 VNNI ----
//
// asr_native::rowwise_int8_vnni(rows (n, k) float32, weight (blocks, k4, 16, 4) int8, colsum (blocks * 16,)
// int32, w_scale (out,) float32, bias (out,)?, out_features) -> (n, out) float32: the same bits as
// rowwise_int8_gemm (the same quantisation; exact int32 products; acc * w_scale, then fma with the row
// scale and the bias), on a kernel for few rows: fbgemm's packed GEMM reads its weights at a third
// of the memory bandwidth when a product has a handful of rows (the decoder's predictor and joiner,
// the encoder's small batches). weight[b, j, c, i] is w[16 b + c, 4 j + i] (zero-padded); colsum the
// rows of w summed, for the uint8 offset (rows are quantised to q + 128: acc - 128 colsum = q . w).

constexpr int kTileRows = 6;    // rows of one register tile (both few-row kernels below)
constexpr int kTileBlocks = 4;  // 16-output blocks of one register tile (6 x 4 = 24 accumulators)

struct VnniTiles {  // int32 accumulators of uint8 rows (4 bytes per step) times int8 weight blocks
  template <int R, int NB>
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile(const uint8_t* q, int64_t q_row,
                                                                         const int8_t* w, int64_t k4, int32_t* acc,
                                                                         int64_t acc_row);
};

template <int R, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void VnniTiles::tile(const uint8_t* q, int64_t q_row,
                                                                             const int8_t* w, int64_t k4,
                                                                             int32_t* acc, int64_t acc_row) {
  // R x NB accumulators in registers (the loops over r and b unrolled)
  __m512i c[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) c[r][b] = _mm512_setzero_si512();
  const int64_t block = k4 * 64;  // bytes of one 16-output block
  for (int64_t j = 0; j < k4; ++j) {
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * block + j * 64);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + r * q_row + 4 * j));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) c[r][b] = _mm512_dpbusd_epi32(c[r][b], a, wv[b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_si512(acc + r * acc_row + 16 * b, c[r][b]);
}

// The register tile of kernel K for `rows` (1..kTileRows) rows and `nb` (1..kTileBlocks) blocks.
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

// The few-row kernels' schedule: tasks of kTileBlocks 16-output blocks (their weights read from
// memory once, for all rows) in parallel, each running its row tiles in turn. body(scratch, first
// block, blocks, first output column, columns, first row, rows) computes one tile; scratch holds a
// tile's accumulators (row stride 16 * kTileBlocks).
template <class Acc, class Body>
void for_each_tile(int64_t n, int64_t blocks, int64_t m, const Body& body) {
  const int64_t groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) Acc scratch[kTileRows * 16 * kTileBlocks];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kTileBlocks;
      const int nb = static_cast<int>(std::min<int64_t>(kTileBlocks, blocks - first));
      const int64_t col = 16 * first, cols = std::min<int64_t>(16 * nb, m - col);
      for (int64_t r0 = 0; r0 < n; r0 += kTileRows)
        body(scratch, first, nb, col, cols, r0, static_cast<int>(std::min<int64_t>(kTileRows, n - r0)));
    }
  });
}

__attribute__((target("avx512f"))) void vnni_epilogue(const int32_t* acc, const int32_t* colsum,
                                                      const float* w_scale, const float* bias, float row_scale,
                                                      float* out, int64_t m) {
  // (float)(acc - 128 colsum) * w_scale, then fma(., row_scale, bias) (or * row_scale): one rounding
  // each, as fbgemm's float output stage at unit activation scale and rowwise_int8_gemm's last pass
  const __m512i offset = _mm512_set1_epi32(128);
  const __m512 s = _mm512_set1_ps(row_scale);
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    const __m512i raw = _mm512_sub_epi32(_mm512_loadu_si512(acc + j),
                                         _mm512_mullo_epi32(offset, _mm512_loadu_si512(colsum + j)));
    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(raw), _mm512_loadu_ps(w_scale + j));
    _mm512_storeu_ps(out + j, bias != nullptr ? _mm512_fmadd_ps(x, s, _mm512_loadu_ps(bias + j))
                                              : _mm512_mul_ps(x, s));
  }
  for (; j < m; ++j) {
    const float x = static_cast<float>(acc[j] - 128 * colsum[j]) * w_scale[j];
    out[j] = bias != nullptr ? std::fma(x, row_scale, bias[j]) : x * row_scale;
  }
}

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

at::Tensor rowwise_int8_vnni(const at::Tensor& rows_in, const at::Tensor& weight, const at::Tensor& colsum,
                             const at::Tensor& w_scale, const std::optional<at::Tensor>& bias_in,
                             int64_t out_features) {
  TORCH_CHECK(cpu_has_vnni(), "rowwise_int8_vnni needs AVX-512 VNNI");
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kChar && weight.size(2) == 16 && weight.size(3) == 4 &&
                  weight.is_contiguous(),
              "weight must be (blocks, k4, 16, 4) int8, contiguous");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1), blocks = weight.size(0), k4 = weight.size(1);
  const int64_t m = out_features;
  TORCH_CHECK(k4 == (k + 3) / 4, "rows have ", k, " columns, the weights ", 4 * k4);
  TORCH_CHECK(m > 0 && m <= 16 * blocks && 16 * blocks < m + 16, "out_features does not match the weight blocks");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.numel() == 16 * blocks,
              "colsum must be (blocks * 16,) int32");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == m,
              "w_scale must be (out,) float32");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == m, "bias must be (", m, ",) float32");
  }
  const int64_t kp = 4 * k4;
  at::Tensor quantised = at::empty({n, kp}, rows.options().dtype(at::kByte));
  at::Tensor scale = at::empty({n}, rows.options());
  const float* x = rows.data_ptr<float>();
  uint8_t* q = quantised.data_ptr<uint8_t>();
  float* s = scale.data_ptr<float>();
  if (kp == k) {
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
      quantize_rows_u8(x, q, s, begin, end, k);
    });
  } else {  // padding columns: any value (their weights are zero); 128 keeps them zero anyway
    std::vector<uint8_t> row(k);
    for (int64_t i = 0; i < n; ++i) {
      quantize_rows_u8(x + i * k, row.data(), s + i, 0, 1, k);
      std::memcpy(q + i * kp, row.data(), k);
      std::memset(q + i * kp + k, 128, kp - k);
    }
  }
  at::Tensor out = at::empty({n, m}, rows.options());
  float* o = out.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int32_t* cs = colsum.data_ptr<int32_t>();
  const float* ws = w_scale.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  for_each_tile<int32_t>(n, blocks, m, [&](int32_t* acc, int64_t first, int nb, int64_t col, int64_t cols,
                                            int64_t r0, int rr) {
    tile_for<VnniTiles>(rr, nb)(q + r0 * kp, kp, wp + first * k4 * 64, k4, acc, 16 * kTileBlocks);
    for (int r = 0; r < rr; ++r)
      vnni_epilogue(acc + r * 16 * kTileBlocks, cs + col, ws + col, b == nullptr ? nullptr : b + col, s[r0 + r],
                    o + (r0 + r) * m + col, cols);
  });
  return out;
}


// ---- fp32 products on AVX-512, each output row independent of the others ----
//
// asr_native::linear_f32(rows (n, k) float32, weight (blocks, k, 16) float32, bias (out,)?, out_features)
// -> (n, out) float32: rows @ w.T + bias, weight[b, j, c] = w[16 b + c, j] (zero-padded). Every output
// is one fma chain over j = 0 .. k-1 in order, then + bias: the same bits for a row whatever the
// other rows (batching never moves a result), and weights read once per call for any row count.

struct F32Tiles {  // float accumulators of float rows (1 input per step) times float weight blocks
  template <int R, int NB>
  __attribute__((target("avx512f"))) static void tile(const float* x, int64_t x_row, const float* w, int64_t k,
                                                      float* out, int64_t out_row);
};

template <int R, int NB>
__attribute__((target("avx512f"))) void F32Tiles::tile(const float* x, int64_t x_row, const float* w, int64_t k,
                                                       float* out, int64_t out_row) {
  __m512 c[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) c[r][b] = _mm512_setzero_ps();
  const int64_t block = k * 16;  // floats of one 16-output block
  for (int64_t j = 0; j < k; ++j) {
    __m512 wv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + b * block + j * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * x_row + j]);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) c[r][b] = _mm512_fmadd_ps(a, wv[b], c[r][b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + r * out_row + 16 * b, c[r][b]);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

at::Tensor linear_f32(const at::Tensor& rows_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                      int64_t out_features) {
  TORCH_CHECK(cpu_has_avx512(), "linear_f32 needs AVX-512");
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kFloat && weight.size(2) == 16 && weight.is_contiguous(),
              "weight must be (blocks, k, 16) float32, contiguous");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1), blocks = weight.size(0), m = out_features;
  TORCH_CHECK(weight.size(1) == k, "rows have ", k, " columns, the weights ", weight.size(1));
  TORCH_CHECK(m > 0 && m <= 16 * blocks && 16 * blocks < m + 16, "out_features does not match the weight blocks");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == m, "bias must be (", m, ",) float32");
  }
  at::Tensor out = at::empty({n, m}, rows.options());
  const float* x = rows.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  for_each_tile<float>(n, blocks, m, [&](float* tile, int64_t first, int nb, int64_t col, int64_t cols, int64_t r0,
                                         int rr) {
    tile_for<F32Tiles>(rr, nb)(x + r0 * k, k, wp + first * k * 16, k, tile, 16 * kTileBlocks);
    for (int r = 0; r < rr; ++r) {
      const float* t = tile + r * 16 * kTileBlocks;
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
// asr_native::predictor_step(tokens (n,) int64, embedding (V, D) float32, linears, linear_kind,
// out_features, norms, eps, state, rows?) -> (output (n, E), new state): torchaudio's _Predictor
// for one symbol per row (embedding, input layer norm, L _CustomLSTM layers, linear, output layer
// norm), the same operators in the same order as the Python modules (so the same bits), without
// the ~220 dispatched calls and Python frames of the module path. Products run on this file's
// kernels: linear_kind 0 = linear_f32 (each linear [weight, bias]), 1 = rowwise_int8_vnni ([weight,
// colsum, w_scale, bias]); a 0-element bias is none. Linears in order x2g, p2g per layer, then the
// output linear; out_features per linear. norms: (weight, bias) pairs, input norm, then per layer
// the gate and cell norms when there are 2 + 4 L + 2 of them (torchaudio's lstm_layer_norm), then
// the output norm; eps: input, LSTM, output. state: h, c per layer. With rows (n,) int64, state
// holds every stream (B, H): the step reads rows' states and writes their new ones in place
// (returned too); without, state is (n, H) and is left as it is.

// The fused operators call the kernels directly (no dispatch); RECORD_FUNCTION names them to
// torch.profiler as if dispatched (bench/step_profile.py counts products by name), at no cost
// when no profiler runs.
at::Tensor apply_linear(const std::vector<at::Tensor>& t, int64_t kind, int64_t out_features, const at::Tensor& x) {
  RECORD_FUNCTION(kind == 0 ? "asr_native::linear_f32" : "asr_native::rowwise_int8_vnni", std::vector<c10::IValue>());
  if (kind == 0) {
    std::optional<at::Tensor> bias;
    if (t[1].numel() > 0) bias = t[1];
    return linear_f32(x, t[0], bias, out_features);
  }
  std::optional<at::Tensor> bias;
  if (t[3].numel() > 0) bias = t[3];
  return rowwise_int8_vnni(x, t[0], t[1], t[2], bias, out_features);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> predictor_step(
    const at::Tensor& tokens, const at::Tensor& embedding, const std::vector<at::Tensor>& linears,
    int64_t linear_kind, const std::vector<int64_t>& out_features, const std::vector<at::Tensor>& norms,
    const std::vector<double>& eps, const std::vector<at::Tensor>& state, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(linear_kind == 0 || linear_kind == 1, "linear_kind must be 0 (fp32) or 1 (int8 VNNI)");
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
// asr_native::emformer_layers(x (B, rows, D) float32, linears, linear_kind, out_features, norms, eps,
// activation, ring_kv (slots, L, 2, P, D): LeftContextPool.kv, read in place; slots, valid, carried?,
// heads, scale) -> (x after the L layers (B, rows, D), segments (B, L, 2, 4, D)): the loop of
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
  TORCH_CHECK(linear_kind == 0 || linear_kind == 1, "linear_kind must be 0 (fp32) or 1 (int8 VNNI)");
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

TORCH_LIBRARY(asr_native, m) {
  m.def("rowwise_quantize_u8(Tensor rows, int padded_rows) -> (Tensor, Tensor)");
  m.def("ring_attention(Tensor q, Tensor k, Tensor v, Tensor ring_kv, Tensor slots, Tensor valid, Tensor? carried, "
        "int heads, float scale) -> Tensor");
  m.def("rowwise_int8_gemm(Tensor rows, __torch__.torch.classes.quantized.LinearPackedParamsBase packed, "
        "Tensor? bias) -> Tensor");
  m.def("rowwise_int8_vnni(Tensor rows, Tensor weight, Tensor colsum, Tensor w_scale, Tensor? bias, "
        "int out_features) -> Tensor");
  m.def("linear_f32(Tensor rows, Tensor weight, Tensor? bias, int out_features) -> Tensor");
  m.def("predictor_step(Tensor tokens, Tensor embedding, Tensor[] linears, int linear_kind, int[] out_features, "
        "Tensor[] norms, float[] eps, Tensor(a!)[] state, Tensor? rows) -> (Tensor, Tensor[])");
  m.def("emformer_layers(Tensor x, Tensor[] linears, int linear_kind, int[] out_features, Tensor[] norms, "
        "float[] eps, int activation, Tensor ring_kv, Tensor slots, Tensor valid, Tensor? carried, int heads, "
        "float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(asr_native, CPU, m) {
  m.impl("rowwise_quantize_u8", &rowwise_quantize_u8);
  m.impl("rowwise_int8_gemm", &rowwise_int8_gemm);
  m.impl("ring_attention", &ring_attention);
  m.impl("rowwise_int8_vnni", &rowwise_int8_vnni);
  m.impl("linear_f32", &linear_f32);
  m.impl("predictor_step", &predictor_step);
  m.impl("emformer_layers", &emformer_layers);
}
