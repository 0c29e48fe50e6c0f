// RoSTE family, CUDA kernels of the butterfly Hadamard transform (the stage plan and arithmetic of
// hadamard_math.h). Power-of-two rows of 256..4096: one warp per row, all in registers and shuffles
// (hadamard_warp_kernel). Otherwise one block per row; bits 0..2 in registers, the next up to 5 bits by warp
// shuffles, the rest in shared memory (the row in fp32, n * 4 bytes), then the factor H_m column by
// column in registers, the scale, one rounding to the output dtype. Loads (and the stores of m = 1)
// move 8 consecutive elements per thread as 16-byte vectors; out is a fresh allocation (aligned).
#include <cuda_runtime.h>

#include "fusedtune/roste_cuda.h"

namespace fusedtune {
namespace roste {

// kE consecutive elements of chunk c as fp32: one or two 16-byte loads
__device__ __forceinline__ void load_chunk(const void* row, int64_t c, int dt, float v[kE]) {
  if (dt == FT_F32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + c * kE);
    const float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + c * kE);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
    FT_UNROLL
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = load_as_f32(w[k] & 0xFFFFu, dt);
      v[2 * k + 1] = load_as_f32(w[k] >> 16, dt);
    }
  }
}

// kE consecutive results (scaled, rounded to dt) at chunk c: one or two 16-byte stores
__device__ __forceinline__ void store_chunk(void* row, int64_t c, int dt, const float* v, float scale) {
  uint32_t b[kE];
  FT_UNROLL
  for (int e = 0; e < kE; ++e) b[e] = round_rne(ft_mul(v[e], scale), dt);
  if (dt == FT_F32) {
    uint4* p = reinterpret_cast<uint4*>(static_cast<uint32_t*>(row) + c * kE);
    p[0] = make_uint4(b[0], b[1], b[2], b[3]);
    p[1] = make_uint4(b[4], b[5], b[6], b[7]);
  } else {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(row) + c * kE) =
        make_uint4(b[0] | (b[1] << 16), b[2] | (b[3] << 16), b[4] | (b[5] << 16), b[6] | (b[7] << 16));
  }
}

template <int M>
__global__ void __launch_bounds__(kMaxThreads, M == 1 ? 3 : 1)
    hadamard_kernel(const void* __restrict__ x, void* __restrict__ out, const Plan pl, const Signs sg, float scale,
                    int dt) {
  extern __shared__ float4 smem4[];
  float* s = reinterpret_cast<float*>(smem4);
  const int n = pl.m * pl.p;
  const int64_t esize = dt == FT_F32 ? 4 : 2;
  const char* xr = static_cast<const char*>(x) + (int64_t)blockIdx.x * n * esize;
  char* orow = static_cast<char*>(out) + (int64_t)blockIdx.x * n * esize;
  const int t = threadIdx.x, lane = t & 31;
  for (int it = 0; it < pl.iters; ++it) {
    const int64_t c = t + (int64_t)it * pl.threads;
    float v[kE];
    load_chunk(xr, c, dt, v);
    butterfly8(v);
    for (int st = 0; st < pl.shfl; ++st) {
      const bool upper = (lane >> st) & 1;
      FT_UNROLL
      for (int e = 0; e < kE; ++e) v[e] = lane_combine(v[e], __shfl_xor_sync(0xffffffffu, v[e], 1 << st), upper);
    }
    float4* d = reinterpret_cast<float4*>(s + c * kE);
    d[0] = make_float4(v[0], v[1], v[2], v[3]);
    d[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  __syncthreads();
  for (int b = 3 + pl.shfl, r; (r = pass_bits(pl, b)) != 0; b += r) {
    const int groups = n >> r;
    for (int g = t; g < groups; g += pl.threads) {
      if (r == 3) radix_pass<3>(s, g, b);
      else if (r == 2) radix_pass<2>(s, g, b);
      else radix_pass<1>(s, g, b);
    }
    __syncthreads();
  }
  if (M == 1) {                                 // kE elements per thread: one 16-byte store (two for fp32)
    for (int c = t; c < n / kE; c += pl.threads) store_chunk(orow, c, dt, s + c * kE, scale);
  } else {
    for (int j = t; j < pl.p; j += pl.threads) factor_column<M>(s, pl.p, j, sg.neg, scale, orow, dt);
  }
}

// Rows of n = p = 256 * C elements (C = 1..16), one warp per row, no shared memory: lane l holds chunks
// l + 32 i (i < C), so element bits 0..2 are a chunk's registers, bits 3..7 the lane (shuffles) and bits
// 8.. the chunk number i (registers again). The stages run on bits 0, 1, 2, ... in the same order and
// with the same adds as the block kernel's plan (radix passes are radix-2 stages in bit order), so the
// results are the same bits. A warp issues its whole row's loads (C 16-byte vectors a lane) before any
// arithmetic, and 4 warps a block keep several rows in flight per SM (the block kernel held one row per
// 512 threads between barriers: 2.6x a memcpy at 4096 on an H200, bench/results/roste.csv).
constexpr int kWarpRows = 4;   // warps (rows) per block

template <int C>
__global__ void __launch_bounds__(32 * kWarpRows) hadamard_warp_kernel(const void* __restrict__ x,
                                                                        void* __restrict__ out, int64_t rows,
                                                                        float scale, int dt) {
  const int64_t row = (int64_t)blockIdx.x * kWarpRows + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int n = 256 * C, lane = threadIdx.x & 31;
  const int64_t esize = dt == FT_F32 ? 4 : 2;
  const char* xr = static_cast<const char*>(x) + row * n * esize;
  char* orow = static_cast<char*>(out) + row * n * esize;
  float v[C][kE];
  FT_UNROLL
  for (int i = 0; i < C; ++i) load_chunk(xr, lane + 32 * i, dt, v[i]);
  FT_UNROLL
  for (int i = 0; i < C; ++i) butterfly8(v[i]);
  FT_UNROLL
  for (int st = 0; st < 5; ++st) {
    const bool upper = (lane >> st) & 1;
    FT_UNROLL
    for (int i = 0; i < C; ++i) {
      FT_UNROLL
      for (int e = 0; e < kE; ++e) v[i][e] = lane_combine(v[i][e], __shfl_xor_sync(0xffffffffu, v[i][e], 1 << st), upper);
    }
  }
  FT_UNROLL
  for (int h = 1; h < C; h <<= 1) {
    FT_UNROLL
    for (int i = 0; i < C; ++i) {
      if (!(i & h)) {
        FT_UNROLL
        for (int e = 0; e < kE; ++e) {
          const float a = v[i][e], b = v[i + h][e];
          v[i][e] = ft_add(a, b);
          v[i + h][e] = ft_sub(a, b);
        }
      }
    }
  }
  FT_UNROLL
  for (int i = 0; i < C; ++i) store_chunk(orow, lane + 32 * i, dt, v[i], scale);
}

template <int C>
cudaError_t launch_warp(const void* x, void* out, int64_t rows, float scale, int dt, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarpRows - 1) / kWarpRows;
  hadamard_warp_kernel<C><<<(unsigned)blocks, 32 * kWarpRows, 0, stream>>>(x, out, rows, scale, dt);
  return cudaGetLastError();
}

template <int M>
cudaError_t launch(const void* x, void* out, int64_t rows, const Plan& pl, const Signs& sg, float scale, int dt,
                   cudaStream_t stream) {
  const int smem = pl.m * pl.p * (int)sizeof(float);
  if (smem > 48 * 1024) {                       // opt in (per device: set on every such launch)
    cudaError_t err = cudaFuncSetAttribute(hadamard_kernel<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  hadamard_kernel<M><<<(unsigned)rows, pl.threads, smem, stream>>>(x, out, pl, sg, scale, dt);
  return cudaGetLastError();
}

cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, const Plan& pl, const Signs& sg, float scale,
                            int dt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (pl.m == 1 && pl.p >= 256 && pl.p <= 4096) {   // a row in one warp's registers
    switch (pl.p) {
      case 256: return launch_warp<1>(x, out, rows, scale, dt, stream);
      case 512: return launch_warp<2>(x, out, rows, scale, dt, stream);
      case 1024: return launch_warp<4>(x, out, rows, scale, dt, stream);
      case 2048: return launch_warp<8>(x, out, rows, scale, dt, stream);
      default: return launch_warp<16>(x, out, rows, scale, dt, stream);
    }
  }
  switch (pl.m) {
    case 1: return launch<1>(x, out, rows, pl, sg, scale, dt, stream);
    case 12: return launch<12>(x, out, rows, pl, sg, scale, dt, stream);
    case 20: return launch<20>(x, out, rows, pl, sg, scale, dt, stream);
    case 28: return launch<28>(x, out, rows, pl, sg, scale, dt, stream);
    case 36: return launch<36>(x, out, rows, pl, sg, scale, dt, stream);
    case 40: return launch<40>(x, out, rows, pl, sg, scale, dt, stream);
    case 44: return launch<44>(x, out, rows, pl, sg, scale, dt, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace roste
}  // namespace fusedtune
