// Device pieces of the Hadamard CUDA kernels shared by the butterfly kernels (roste.cu) and the
// tensor-core factor kernel (roste_mma.cu): the 16-bit output packing, a chunk's scaled store and a lane stage.
#pragma once
#include <cuda_runtime.h>

#include "fusedtune/hadamard_math.h"
#include "fusedtune/vec8.cuh"

namespace fusedtune {
namespace roste {

// two fp32 values rounded to nearest even into one 32-bit word of 16-bit values (lo in the low half)
template <int DT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
  uint32_t d;
  if (DT == FT_BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return round_rne(lo, DT) | (round_rne(hi, DT) << 16);
#endif
}

// kE consecutive results at chunk c, times scale, rounded once: one 16-byte store (two for fp32)
template <int DT>
__device__ __forceinline__ void store_chunk(void* row, int64_t c, const float* v, float scale) {
  float s[kE];
  FT_UNROLL
  for (int e = 0; e < kE; ++e) s[e] = ft_mul(v[e], scale);
  if constexpr (DT == FT_F32) {
    uint4* p = reinterpret_cast<uint4*>(static_cast<float*>(row) + c * kE);
    p[0] = make_uint4(__float_as_uint(s[0]), __float_as_uint(s[1]), __float_as_uint(s[2]), __float_as_uint(s[3]));
    p[1] = make_uint4(__float_as_uint(s[4]), __float_as_uint(s[5]), __float_as_uint(s[6]), __float_as_uint(s[7]));
  } else {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(row) + c * kE) =
        make_uint4(pack2<DT>(s[0], s[1]), pack2<DT>(s[2], s[3]), pack2<DT>(s[4], s[5]), pack2<DT>(s[6], s[7]));
  }
}

// lane stage st on every element of a chunk: lower lane a + b, upper lane a - b (a the lower's value)
__device__ __forceinline__ void lane_stage(float v[kE], int lane, int st) {
  const float sgn = ((lane >> st) & 1) ? -1.0f : 1.0f;
  FT_UNROLL
  for (int e = 0; e < kE; ++e) v[e] = __fmaf_rn(v[e], sgn, __shfl_xor_sync(0xffffffffu, v[e], 1 << st));
}

}  // namespace roste
}  // namespace fusedtune
