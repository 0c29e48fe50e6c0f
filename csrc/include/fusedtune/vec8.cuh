// Device helpers for kernels that move 8 consecutive elements a thread as 16-byte vectors (one for 16-bit
// dtypes, two for fp32) and compute in fp32, staged through shared memory by cp.async: the RoSTE
// Hadamard and the FP8 quantizers.
#pragma once
#include <cuda_runtime.h>

#include "fusedtune/common.h"

namespace fusedtune {

constexpr int kVec8 = 8;   // elements a chunk

// One chunk of 8 elements in storage.
template <int DT>
struct Raw {
  uint4 q[DT == FT_F32 ? 2 : 1];
};

// chunk c of a row (chunks of 8 elements from row)
template <int DT>
__device__ __forceinline__ Raw<DT> load_raw(const void* row, int64_t c) {
  const uint4* p = reinterpret_cast<const uint4*>(static_cast<const char*>(row) + c * kVec8 * (DT == FT_F32 ? 4 : 2));
  Raw<DT> r;
  FT_UNROLL
  for (int k = 0; k < (DT == FT_F32 ? 2 : 1); ++k) r.q[k] = p[k];
  return r;
}

template <int DT>
__device__ __forceinline__ float half_to_f32(uint32_t h) {   // h: the 16 bits in the low half
  if (DT == FT_BF16) return __uint_as_float(h << 16);
#if __CUDA_ARCH__ >= 530
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
  return f;
#else
  return f16_to_f32(h);
#endif
}

// element e of a chunk, exactly, in fp32
template <int DT>
__device__ __forceinline__ float raw_elem(const Raw<DT>& r, int e) {
  if constexpr (DT == FT_F32) {
    const uint4& v = r.q[e >> 2];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    return __uint_as_float(w[e & 3]);
  } else {
    const uint32_t w[4] = {r.q[0].x, r.q[0].y, r.q[0].z, r.q[0].w};
    const uint32_t h = w[e >> 1];
    if (e & 1) return DT == FT_BF16 ? __uint_as_float(h & 0xFFFF0000u) : half_to_f32<DT>(h >> 16);
    return half_to_f32<DT>(h & 0xFFFFu);
  }
}

template <int DT>
__device__ __forceinline__ void unpack(const Raw<DT>& r, float v[kVec8]) {
  FT_UNROLL
  for (int e = 0; e < kVec8; ++e) v[e] = raw_elem<DT>(r, e);
}

// cp.async (sm_80+; a plain copy before): 16 bytes global -> shared, in flight until wait_copies. kL1:
// through L1 (cp.async.ca), for a thread's two adjacent 16-byte vectors (an fp32 chunk), whose first copy
// brings the 32-byte sectors in and whose second then hits L1 (with .cg each would fetch them from L2)
template <bool kL1 = false>
__device__ __forceinline__ void copy16_async(void* dst_smem, const void* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst_smem);
  if (kL1) asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
  else asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
  *static_cast<uint4*>(dst_smem) = *static_cast<const uint4*>(src);
#endif
}

// a thread's kV (1 or 2) adjacent 16-byte vectors
template <int kV>
__device__ __forceinline__ void copy_chunk_async(uint4* dst_smem, const char* src, int64_t dst_stride = 1) {
  FT_UNROLL
  for (int k = 0; k < kV; ++k) {
    copy16_async<(kV > 1)>(dst_smem + k * dst_stride, src + 16 * k);
  }
}

__device__ __forceinline__ void commit_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// until at most N of this thread's committed groups are still in flight
template <int N>
__device__ __forceinline__ void wait_copies_but() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

}  // namespace fusedtune
