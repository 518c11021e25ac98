// server.precision.RowwiseInt8Linear's int8 products in single operators, bit for bit the results
// of the composed torch path (each row quantised with its own scale max|row| / 127, clamped at
// 1e-12 / 127, to round(row / scale); exact int32 products; weight scale, row scale, bias).
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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

}  // namespace

TORCH_LIBRARY(asr_native, m) {
  m.def("rowwise_quantize_u8(Tensor rows, int padded_rows) -> (Tensor, Tensor)");
  m.def("rowwise_int8_gemm(Tensor rows, __torch__.torch.classes.quantized.LinearPackedParamsBase packed, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(asr_native, CPU, m) {
  m.impl("rowwise_quantize_u8", &rowwise_quantize_u8);
  m.impl("rowwise_int8_gemm", &rowwise_int8_gemm);
}
