// Stand-in for asmjit's core header, which torch's fbgemm headers include but torch's wheel does
// not ship. fbgemm's headers only name asmjit's vector register types (in code that generates
// kernels at run time, which these operators never instantiate), so empty types suffice. The
// version is below 1.17, so fbgemm's SimdUtils.h takes the plain `using Xmm = asmjit::x86::Xmm`.
#pragma once
#define ASMJIT_LIBRARY_MAKE_VERSION(major, minor, patch) (((major) << 16) | ((minor) << 8) | (patch))
#define ASMJIT_LIBRARY_VERSION ASMJIT_LIBRARY_MAKE_VERSION(1, 0, 0)
#define ASMJIT_INLINE_NODEBUG inline
