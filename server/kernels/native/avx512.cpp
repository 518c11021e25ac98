// The avx512 back end: operators.h over AVX-512 register tiles for the products (16 outputs per
// register; int8 on VNNI's vpdpbusd where the CPU has it, else on AVX-512BW's 16-bit pair sums with
// weights of at most 63) and simd_avx2.h's primitives for the rest. Built with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mavx2 -mfma; server/kernels/native loads it only where /proc/cpuinfo lists them.
// fp32 products give the avx2 back end's bits (one fma chain per output, in the same order).
#include "simd_avx2.h"

namespace simd {

using simd_avx2::dot;
using simd_avx2::dot4;
using simd_avx2::exp_shifted;
using simd_avx2::quantize_rows_u8;
using simd_avx2::weighted_sum_any;

inline bool cpu_supported() {
  static const bool has = simd_avx2::cpu_supported() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
}

inline bool has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
}

// VNNI sums four u8 x s8 products straight into int32; without it the pairs are summed in 16 bits
// (saturating), exact for weights of at most 63 (2 x 255 x 63 < 32 767)
inline int64_t int8_weight_max() { return has_vnni() ? 127 : 63; }

struct F32Tiles {  // float accumulators: one fma chain per output over j in order
  static constexpr int kRows = 6, kBlocks = 4;  // 6 x 4 accumulators of 16 lanes
  template <int R, int NB>
  static void tile(const float* x, int64_t x_row, const float* w, int64_t k, float* out, int64_t out_row) {
    __m512 c[R][NB];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) c[r][b] = _mm512_setzero_ps();
    const int64_t block = k * 16;
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
};

// int32 accumulators of uint8 rows (4 bytes per step) times int8 weight blocks; Vnni: vpdpbusd,
// else vpmaddubsw + vpmaddwd
template <bool Vnni, int R, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_tile(const uint8_t* q, int64_t q_row,
                                                                     const int8_t* w, int64_t k4, int32_t* acc,
                                                                     int64_t acc_row) {
  __m512i c[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) c[r][b] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi16(1);
  const int64_t block = k4 * 64;  // bytes of one 16-output block
  for (int64_t j = 0; j < k4; ++j) {
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * block + j * 64);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * q_row + 4 * j, 4);
      const __m512i a = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        if constexpr (Vnni) {
          c[r][b] = _mm512_dpbusd_epi32(c[r][b], a, wv[b]);
        } else {
          c[r][b] = _mm512_add_epi32(c[r][b], _mm512_madd_epi16(_mm512_maddubs_epi16(a, wv[b]), ones));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_si512(acc + r * acc_row + 16 * b, c[r][b]);
}

struct Int8Tiles {
  static constexpr int kRows = 6, kBlocks = 4;
  template <int R, int NB>
  static void tile(const uint8_t* q, int64_t q_row, const int8_t* w, int64_t k4, int32_t* acc, int64_t acc_row) {
    if (has_vnni()) {
      int8_tile<true, R, NB>(q, q_row, w, k4, acc, acc_row);
    } else {
      int8_tile<false, R, NB>(q, q_row, w, k4, acc, acc_row);
    }
  }
};

// (float)(acc - 128 colsum) * w_scale, then fma(., row_scale, bias) (or * row_scale): simd_avx2's
// roundings, 16 lanes at a time
inline void int8_epilogue(const int32_t* acc, const int32_t* colsum, const float* w_scale, const float* bias,
                          float row_scale, float* out, int64_t m) {
  const __m512i offset = _mm512_set1_epi32(128);
  const __m512 s = _mm512_set1_ps(row_scale);
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    const __m512i raw = _mm512_sub_epi32(_mm512_loadu_si512(acc + j),
                                         _mm512_mullo_epi32(offset, _mm512_loadu_si512(colsum + j)));
    const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(raw), _mm512_loadu_ps(w_scale + j));
    _mm512_storeu_ps(out + j, bias != nullptr ? _mm512_fmadd_ps(x, s, _mm512_loadu_ps(bias + j)) : _mm512_mul_ps(x, s));
  }
  simd_avx2::int8_epilogue(acc + j, colsum + j, w_scale + j, bias == nullptr ? nullptr : bias + j, row_scale, out + j,
                           m - j);
}

}  // namespace simd

#define ASR_NATIVE_LIB asr_avx512
#include "operators.h"
