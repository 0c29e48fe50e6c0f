// Host/device portability helpers shared by every family's math headers.
// Arithmetic whose result must be bit-identical on CPU and GPU goes through ft_add/ft_mul/ft_sub:
// on the device they are the non-contractible __f*_rn intrinsics, on the host plain operators in
// translation units compiled with -ffp-contract=off (setup.py sets it).
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FT_HD __host__ __device__ __forceinline__
#define FT_UNROLL _Pragma("unroll")
#define FT_UNROLL2 _Pragma("unroll 2")
#else
#define FT_HD inline
#define FT_UNROLL
#define FT_UNROLL2
#endif

namespace fusedtune {

FT_HD float ft_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FT_HD float ft_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FT_HD float ft_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FT_HD float ft_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FT_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
FT_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

FT_HD bool f32_isfinite(float f) { return (f32_bits(f) & 0x7F800000u) != 0x7F800000u; }

// Storage formats the multi-tensor kernels handle; values are part of the C++ op schemas.
enum FtDtype : int32_t { FT_F32 = 0, FT_BF16 = 1, FT_F16 = 2 };

// ---- exact conversions: integer ops on the CPU (and before sm_80), so every backend rounds alike --
FT_HD float bf16_to_f32(uint32_t h) { return bits_f32((h & 0xFFFFu) << 16); }

// On sm_80+ the GPU converts with the hardware's round-to-nearest-even (cvt.rn, one F2F in the SASS instead of
// 5-12 integer instructions), which gives the same bits for every value but NaN: the hardware returns a
// canonical NaN, these functions keep the sign and return the quiet pattern, so NaN is fixed up first.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FT_HW_CVT 1
#endif

FT_HD uint32_t f32_to_bf16_rne(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ((x >> 16) & 0x8000u) | 0x7FC0u;  // NaN
#ifdef FT_HW_CVT
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  x += 0x7FFFu + ((x >> 16) & 1u);
  return x >> 16;
#endif
}

FT_HD float f16_to_f32(uint32_t h) {
  uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) return bits_f32(sign | f32_bits(ft_mul((float)m, 5.9604644775390625e-08f)));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

FT_HD uint32_t f32_to_f16_rne(float f) {
  uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
#ifdef FT_HW_CVT
  if (ax > 0x7F800000u) return sign | 0x7E00u;  // NaN
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // rounds to infinity
  if (ax < 0x38800000u) {                          // half subnormal or zero: let the FPU round
    float t = ft_add(bits_f32(ax), 0.5f);          // ulp(0.5f) == 2^-24 == half's subnormal step
    return sign | (f32_bits(t) - 0x3F000000u);
  }
  ax += 0xC8000FFFu + ((ax >> 13) & 1u);  // rebias exponent (-112 << 23) and round to nearest even
  return sign | (ax >> 13);
#endif
}

// Storage bits <-> fp32 value for a dtype; fp32 "bits" are the float's own bits.
FT_HD float load_as_f32(uint32_t bits, int dt) {
  return dt == FT_F32 ? bits_f32(bits) : (dt == FT_BF16 ? bf16_to_f32(bits) : f16_to_f32(bits));
}
FT_HD uint32_t round_rne(float v, int dt) {
  return dt == FT_F32 ? f32_bits(v) : (dt == FT_BF16 ? f32_to_bf16_rne(v) : f32_to_f16_rne(v));
}

// Element i of a storage array of format dt, as bits.
FT_HD uint32_t load_bits(const void* base, int64_t i, int dt) {
  return dt == FT_F32 ? static_cast<const uint32_t*>(base)[i] : static_cast<const uint16_t*>(base)[i];
}
FT_HD void store_bits(void* base, int64_t i, int dt, uint32_t b) {
  if (dt == FT_F32)
    static_cast<uint32_t*>(base)[i] = b;
  else
    static_cast<uint16_t*>(base)[i] = (uint16_t)b;
}

}  // namespace fusedtune
