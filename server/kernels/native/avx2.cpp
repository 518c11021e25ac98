// The avx2 back end: operators.h over AVX2 + FMA primitives (simd_avx2.h). Built with -mavx2 -mfma;
// server/kernels/native loads it only where /proc/cpuinfo lists both. int8 weights are limited to 63 in
// magnitude here (see simd_avx2.h), so its int8 products are exact.
#include "simd_avx2.h"

namespace simd {
using namespace simd_avx2;
}  // namespace simd

#define ASR_NATIVE_LIB asr_avx2
#include "operators.h"
