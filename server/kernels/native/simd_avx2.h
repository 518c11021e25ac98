// AVX2 + FMA primitives of operators.h (the avx2 back end; the avx512 back end takes the ones it
// does not replace). Compiled with -mavx2 -mfma; loaded only where the CPU has both.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace simd_avx2 {

inline bool cpu_supported() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline float row_abs_max(const float* x, int64_t k) {  // max |x_j|
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

inline void quantize_rows_u8(const float* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s,
                             int64_t begin, int64_t end, int64_t k) {
  // scale max|row| / 127 (at least 1e-12 / 127); round half to even (torch.round), then + 128:
  // exact on integers
  const __m256 offset = _mm256_set1_ps(128.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * k;
    const float m = row_abs_max(xi, k);
    const float si = (m > 1e-12f ? m : 1e-12f) / 127.0f;
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

inline __m256 exp_ps(__m256 x) {  // e^x, Cephes' single-precision polynomial (about 1 ulp), x <= 88
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

inline void exp_shifted(float* p, int64_t padded, float top) {
  const __m256 top_v = _mm256_set1_ps(top);
  for (int64_t j = 0; j < padded; j += 8) _mm256_storeu_ps(p + j, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + j), top_v)));
}

inline float hsum(__m256 v) {  // the 8 lanes summed
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

inline float dot(const float* a, const float* b, int64_t n) {  // n a multiple of 8
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
inline void dot4(const float* a, const float* const* b, int64_t n, float* out) {
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

inline void weighted_sum_any(const float* p, const float* const* values, int64_t n, int64_t offset, int64_t width,
                             float inv, float* o) {  // width a multiple of 8
  using Fn = void (*)(const float*, const float* const*, int64_t, int64_t, float, float*);
  static constexpr Fn by_chunks[] = {nullptr, &weighted_sum<1>, &weighted_sum<2>, &weighted_sum<3>,
                                     &weighted_sum<4>, &weighted_sum<5>, &weighted_sum<6>, &weighted_sum<7>,
                                     &weighted_sum<8>};
  for (int64_t d = 0; d < width; d += 64) {
    const int64_t chunks = (width - d) / 8 < 8 ? (width - d) / 8 : 8;
    by_chunks[chunks](p, values, n, offset + d, inv, o + d);
  }
}

// Register tiles: R rows x NB blocks of 16 outputs, each block two 8-lane registers (16 registers
// in all: 4 x 1 tiles keep accumulators, weights and the broadcast row value in them).
struct F32Tiles {  // float accumulators: one fma chain per output over j in order
  static constexpr int kRows = 4, kBlocks = 1;
  template <int R, int NB>
  static void tile(const float* x, int64_t x_row, const float* w, int64_t k, float* out, int64_t out_row) {
    __m256 c[R][NB][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) c[r][b][0] = c[r][b][1] = _mm256_setzero_ps();
    const int64_t block = k * 16;
    for (int64_t j = 0; j < k; ++j) {
      __m256 wv[NB][2];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        wv[b][0] = _mm256_loadu_ps(w + b * block + j * 16);
        wv[b][1] = _mm256_loadu_ps(w + b * block + j * 16 + 8);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_set1_ps(x[r * x_row + j]);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          c[r][b][0] = _mm256_fmadd_ps(a, wv[b][0], c[r][b][0]);
          c[r][b][1] = _mm256_fmadd_ps(a, wv[b][1], c[r][b][1]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        _mm256_storeu_ps(out + r * out_row + 16 * b, c[r][b][0]);
        _mm256_storeu_ps(out + r * out_row + 16 * b + 8, c[r][b][1]);
      }
  }
};

// int8 weights of at most 63 in magnitude: vpmaddubsw sums each pair of u8 x s8 products in
// 16 bits with saturation, and 2 x 255 x 63 = 32 130 stays below 32 767, so the int32 sums are exact.
inline int64_t int8_weight_max() { return 63; }

struct Int8Tiles {  // int32 accumulators of uint8 rows (4 bytes per step) times int8 weight blocks
  static constexpr int kRows = 4, kBlocks = 1;
  template <int R, int NB>
  static void tile(const uint8_t* q, int64_t q_row, const int8_t* w, int64_t k4, int32_t* acc, int64_t acc_row) {
    __m256i c[R][NB][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) c[r][b][0] = c[r][b][1] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t block = k4 * 64;  // bytes of one 16-output block
    for (int64_t j = 0; j < k4; ++j) {
      __m256i wv[NB][2];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        wv[b][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * block + j * 64));
        wv[b][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * block + j * 64 + 32));
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, q + r * q_row + 4 * j, 4);
        const __m256i a = _mm256_set1_epi32(four);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b)
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h)
            c[r][b][h] = _mm256_add_epi32(c[r][b][h], _mm256_madd_epi16(_mm256_maddubs_epi16(a, wv[b][h]), ones));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * acc_row + 16 * b), c[r][b][0]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * acc_row + 16 * b + 8), c[r][b][1]);
      }
  }
};

// (float)(acc - 128 colsum) * w_scale, then fma(., row_scale, bias) (or * row_scale): one rounding
// each, as the composed torch path (fbgemm's float output stage at unit activation scale, addcmul)
inline void int8_epilogue(const int32_t* acc, const int32_t* colsum, const float* w_scale, const float* bias,
                          float row_scale, float* out, int64_t m) {
  const __m256i offset = _mm256_set1_epi32(128);
  const __m256 s = _mm256_set1_ps(row_scale);
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    const __m256i raw = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)),
                                         _mm256_mullo_epi32(offset, _mm256_loadu_si256(
                                                                        reinterpret_cast<const __m256i*>(colsum + j))));
    const __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(raw), _mm256_loadu_ps(w_scale + j));
    _mm256_storeu_ps(out + j, bias != nullptr ? _mm256_fmadd_ps(x, s, _mm256_loadu_ps(bias + j)) : _mm256_mul_ps(x, s));
  }
  for (; j < m; ++j) {
    const float x = static_cast<float>(acc[j] - 128 * colsum[j]) * w_scale[j];
    out[j] = bias != nullptr ? std::fma(x, row_scale, bias[j]) : x * row_scale;
  }
}

}  // namespace simd_avx2
