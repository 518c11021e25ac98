// Row-wise int8 linear on fbgemm in one call: server.precision.RowwiseInt8Linear's small-product
// path (abs, amax, clamp, two divides, a concatenation, fbgemm, a slice and an addcmul: about ten
// dispatched operators in Python) fused into one operator, bit for bit the same result.
//
// asr_native::rowwise_quantize_u8(rows (n, k) float32, padded_rows) -> (quantised (padded_rows, k)
// uint8, scale (n, 1) float32): the large-product (oneDNN) path's activation quantisation in one
// pass instead of six: round(row / scale) + 128, the padding rows all 128 (zero).
//
// asr_native::rowwise_int8_linear(rows (n, k) float32, packed fbgemm weights, bias (out,)?) ->
// (n, out) float32. Each row is divided by its scale max|row| / 127 (clamped at 1e-12 / 127);
// a range row (-128, 127, 0, ...) appended pins fbgemm's per-batch quantisation to scale 1 and
// zero point 128, so every value quantises exactly and each row depends on itself alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

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

void unit_rows(const float* __restrict__ x, float* __restrict__ u, float* __restrict__ s, int64_t begin,
               int64_t end, int64_t k) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * k;
    const float si = row_scale(xi, k);
    s[i] = si;
    float* ui = u + i * k;
    for (int64_t j = 0; j < k; ++j) ui[j] = xi[j] / si;  // a true division: the composed path's bits
  }
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

at::Tensor rowwise_int8_linear(const at::Tensor& rows_in, const c10::intrusive_ptr<LinearPackedParamsBase>& packed,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kFloat, "rows must be (n, k) float32");
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.size(0), k = rows.size(1);
  TORCH_CHECK(k >= 2, "rows need at least two columns");
  at::Tensor unit = at::empty({n + 1, k}, rows.options());
  at::Tensor scale = at::empty({n, 1}, rows.options());
  const float* x = rows.data_ptr<float>();
  float* u = unit.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    unit_rows(x, u, s, begin, end, k);
  });
  float* range = u + n * k;
  for (int64_t j = 0; j < k; ++j) range[j] = 0.f;
  range[0] = -128.f;
  range[1] = 127.f;
  const at::Tensor products = packed->apply_dynamic(unit, /*reduce_range=*/false).narrow(0, 0, n);
  // the same epilogue operators as the Python path, so the same bits on every CPU
  return bias.has_value() ? at::addcmul(*bias, products, scale) : products.mul(scale);
}

}  // namespace

TORCH_LIBRARY(asr_native, m) {
  m.def("rowwise_int8_linear(Tensor rows, __torch__.torch.classes.quantized.LinearPackedParamsBase packed, "
        "Tensor? bias) -> Tensor");
  m.def("rowwise_quantize_u8(Tensor rows, int padded_rows) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(asr_native, CPU, m) {
  m.impl("rowwise_int8_linear", &rowwise_int8_linear);
  m.impl("rowwise_quantize_u8", &rowwise_quantize_u8);
}
