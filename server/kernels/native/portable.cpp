// The portable back end: operators.h over plain C++ loops (no instruction set assumed beyond the
// compiler's baseline; the compiler vectorises what it can). The reference the other back ends are
// tested against, and the native path of CPUs without AVX2.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace simd {

inline bool cpu_supported() { return true; }

// products are summed in int32: any int8 weight is exact
inline int64_t int8_weight_max() { return 127; }

// fp32 tiles on the compiler's own 4-lane vectors (GCC / Clang vector extensions: SSE2 on any
// x86-64, NEON on arm64, plain code elsewhere), int8 in plain int32 loops.
typedef float f32x4 __attribute__((vector_size(16)));

inline void quantize_rows_u8(const float* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ s,
                             int64_t begin, int64_t end, int64_t k) {
  // scale max|row| / 127 (at least 1e-12 / 127); round half to even (torch.round), then + 128
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * k;
    float m = 0.f;
    for (int64_t j = 0; j < k; ++j) m = std::fabs(xi[j]) > m ? std::fabs(xi[j]) : m;
    const float si = (m > 1e-12f ? m : 1e-12f) / 127.0f;
    s[i] = si;
    for (int64_t j = 0; j < k; ++j) q[i * k + j] = static_cast<uint8_t>(std::nearbyint(xi[j] / si) + 128.0f);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // n a multiple of 8: fixed order
  for (int64_t i = 0; i < n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * b[i + l];
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

inline void dot4(const float* a, const float* const* b, int64_t n, float* out) {
  for (int t = 0; t < 4; ++t) out[t] = dot(a, b[t], n);
}

inline void exp_shifted(float* p, int64_t padded, float top) {
  for (int64_t j = 0; j < padded; ++j) p[j] = std::exp(p[j] - top);
}

inline void weighted_sum_any(const float* p, const float* const* values, int64_t n, int64_t offset, int64_t width,
                             float inv, float* o) {
  for (int64_t d = 0; d < width; ++d) o[d] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float w = p[j];
    const float* v = values[j] + offset;
    for (int64_t d = 0; d < width; ++d) o[d] += w * v[d];
  }
  for (int64_t d = 0; d < width; ++d) o[d] *= inv;
}

struct F32Tiles {  // one multiply-add chain per output over j in order (a * w, then + c: no fma)
  static constexpr int kRows = 2, kBlocks = 1;
  template <int R, int NB>
  static void tile(const float* x, int64_t x_row, const float* w, int64_t k, float* out, int64_t out_row) {
    f32x4 c[R][NB][4];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b)
        for (int q = 0; q < 4; ++q) c[r][b][q] = f32x4{0.f, 0.f, 0.f, 0.f};
    const int64_t block = k * 16;
    for (int64_t j = 0; j < k; ++j) {
      f32x4 wv[NB][4];
      for (int b = 0; b < NB; ++b) std::memcpy(wv[b], w + b * block + j * 16, sizeof(wv[b]));
      for (int r = 0; r < R; ++r) {
        const float a = x[r * x_row + j];
        for (int b = 0; b < NB; ++b)
          for (int q = 0; q < 4; ++q) c[r][b][q] += a * wv[b][q];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) std::memcpy(out + r * out_row + 16 * b, c[r][b], sizeof(c[r][b]));
  }
};

struct Int8Tiles {  // int32 sums of uint8 rows times int8 weight blocks (4 inputs per step)
  static constexpr int kRows = 4, kBlocks = 1;
  template <int R, int NB>
  static void tile(const uint8_t* q, int64_t q_row, const int8_t* w, int64_t k4, int32_t* acc, int64_t acc_row) {
    int32_t c[R][NB * 16] = {};
    const int64_t block = k4 * 64;
    for (int64_t j = 0; j < k4; ++j)
      for (int r = 0; r < R; ++r) {
        const int32_t a0 = q[r * q_row + 4 * j], a1 = q[r * q_row + 4 * j + 1], a2 = q[r * q_row + 4 * j + 2],
                      a3 = q[r * q_row + 4 * j + 3];
        for (int b = 0; b < NB; ++b)
          for (int l = 0; l < 16; ++l) {
            const int8_t* wl = w + b * block + j * 64 + 4 * l;
            c[r][16 * b + l] += a0 * wl[0] + a1 * wl[1] + a2 * wl[2] + a3 * wl[3];
          }
      }
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < NB * 16; ++l) acc[r * acc_row + l] = c[r][l];
  }
};

inline void int8_epilogue(const int32_t* acc, const int32_t* colsum, const float* w_scale, const float* bias,
                          float row_scale, float* out, int64_t m) {
  // (float)(acc - 128 colsum) * w_scale, then fma(., row_scale, bias): the composed path's roundings
  for (int64_t j = 0; j < m; ++j) {
    const float x = static_cast<float>(acc[j] - 128 * colsum[j]) * w_scale[j];
    out[j] = bias != nullptr ? std::fma(x, row_scale, bias[j]) : x * row_scale;
  }
}

}  // namespace simd

#define ASR_NATIVE_LIB asr_portable
#include "operators.h"
