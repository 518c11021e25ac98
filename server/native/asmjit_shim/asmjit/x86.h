// Stand-in for asmjit's x86 header (see core.h): the register type names fbgemm's headers use.
#pragma once
#include "core.h"
namespace asmjit::x86 {
struct Xmm {};
struct Ymm {};
struct Zmm {};
}  // namespace asmjit::x86
