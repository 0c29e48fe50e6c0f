// FP8 family: the scale and E4M3 rules of python/fusedtune/reference/fp8.py as host/device functions,
// shared by the C++ CPU quantizer (csrc/cpu/fp8.cpp) and the CUDA one (csrc/cuda/fp8.cu), so the CPU tests
// check the arithmetic the GPU runs. Every operation is exactly rounded (IEEE division, integer bit work).
#pragma once
#include "fusedtune/common.h"

namespace fusedtune {
namespace fp8 {

constexpr int kTile = 128;                    // 1x128 tiles, 128x128 blocks
constexpr uint32_t kInfBits = 0x7F800000u;

// |x|'s bits with NaN as +inf: non-negative floats order as their bits, so a block's max of these (an
// integer max) is its amax, and inf exactly when the block holds an inf or a NaN (reference: s = NaN).
FT_HD uint32_t mag_bits(float x) {
  const uint32_t b = f32_bits(x) & 0x7FFFFFFFu;
  return b < kInfBits ? b : kInfBits;
}

// The dequantization multiplier of a block from its amax (a max of mag_bits, as a float): amax / 448,
// with pow2 rounded up to a power of two; the next float32 up where a subnormal (or 0) s times 448 falls
// short of amax; 1 for an all-zero block; NaN for a block holding inf or NaN.
FT_HD float block_scale(float amax, bool pow2) {
  float s = ft_div(amax, 448.0f);
  if (pow2) {
    uint32_t b = f32_bits(s);
    if (b & 0x7FFFFFu) b = ((b >> 23) + 1u) << 23;
    s = bits_f32(b);
  }
  if (s < 1.1754943508222875e-38f && ft_mul(s, 448.0f) < amax) s = bits_f32(f32_bits(s) + 1u);
  if (amax == 0.0f) s = 1.0f;
  return f32_bits(amax) >= kInfBits ? bits_f32(0x7FC00000u) : s;
}

// float32 -> E4M3 (fn) byte: round to nearest even, saturation at 448 (also for inf), NaN -> 0x7F whatever
// its sign: a GPU's division and cvt give that canonical NaN, while x86 passes a NaN operand's sign through,
// so keeping the sign would make the CPU and CUDA kernels' bytes differ on a negative NaN input (torch's
// cast keeps it: 0x7F or 0xFF; tests compare NaN bytes as NaN against it). The integer path of
// triton_kernels/fp8.py's _e4m3_bits.
FT_HD uint32_t e4m3_bits(float v) {
  const uint32_t bits = f32_bits(v), sign = (bits >> 24) & 0x80u, ab = bits & 0x7FFFFFFFu;
  if (ab > kInfBits) return 0x7Fu;
  const float a = bits_f32(ab);
  uint32_t code;
  if (a < 0.015625f) {                        // E4M3 subnormals (and 0): m * 2^-9, m = rne(a * 2^9) in 0..8
    code = (uint32_t)(int32_t)ft_sub(ft_add(ft_mul(a, 512.0f), 8388608.0f), 8388608.0f);
  } else {                                    // rebias the exponent (127 -> 7), drop 20 mantissa bits, ties to even
    const uint32_t b = ab - (120u << 23);
    code = (b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20;
  }
  return (code < 0x7Eu ? code : 0x7Eu) | sign;
}

// E4M3(x / s) needs fl(x / s), the IEEE quotient, only where it decides the byte; a multiplication by the
// reciprocal serves the rest. With r = RN(1 / s) for a normal, finite s (quotient_rcp; else 0: divide),
// q = RN(x * r) = (x / s)(1 + e1)(1 + e2) with |e1|, |e2| <= 2^-24, so q lies within 2.5 fp32 ulps of
// fl(x / s) (|q| <= 448 (1 + 2^-22): no overflow). Then E4M3(q) = E4M3(fl(x / s)) unless an E4M3 rounding
// boundary lies between them: where |q| >= 2^-6 (E4M3 normals) the boundaries are the fp32 values whose 20
// bits below E4M3's 3 mantissa bits are 0x80000 (binade edges are far from any), so q more than 8 steps
// from such a pattern is safe; |q| <= 2^-11 gives a signed 0 either way (|x / s| < 2^-10, which ties to
// 0); between them (E4M3 subnormals) the division decides. quotient_needs_division says which q must be
// replaced by fl(x / s): on Gaussian tiles about 1e-4 of the elements. (A numpy model of this agreed with
// the division on 2.4e8 quotients, E4M3 midpoints +-4 ulps among them; tests/test_fp8_quant_kernels.py
// holds the kernels to the reference's bytes there.)
FT_HD float quotient_rcp(float s) {
  return s >= 1.1754943508222875e-38f && f32_isfinite(s) ? ft_div(1.0f, s) : 0.0f;
}

FT_HD bool quotient_needs_division(float q) {
  const uint32_t b = f32_bits(q) & 0x7FFFFFFFu;
  return b - 0x3A000001u < 0x3C800000u - 0x3A000001u || ((b - 0x7FFF8u) & 0xFFFFFu) <= 16u;
}

// fl(x / s) where it decides E4M3(x / s), else RN(x * r) (r = quotient_rcp(s)): the same E4M3 byte
FT_HD float e4m3_quotient(float x, float s, float r) {
  const float q = ft_mul(x, r);
  return r == 0.0f || quotient_needs_division(q) ? ft_div(x, s) : q;
}

}  // namespace fp8
}  // namespace fusedtune
