// RoSTE family: the Hadamard transform of 16-bit factored rows (n = m * p, m any factor shipped, 12..172,
// p = 2^k) with the factor H_m on tensor cores (hadamard_mma_kernel). The butterfly kernel (roste.cu) applies
// H_m last, on CUDA cores: m adds an element (28 at 14336 = 28 x 512), which with its shared-memory reads
// made it issue-bound at 3.3x a memcpy on an H200 (bench/results/h200_2026-11-30.md); m = 52..172 it does not
// compile at all (172 adds an element at 11008), and Triton served those at 4.7-6.7x.
//
// Here H_m comes first, Y = H_m X with X the row as [m, p], as one mma.sync.m16n8k16 GEMM per row (A = H_m
// zero-padded to MP = 16 * ceil(m / 16), given as a small device matrix h and held in registers; B = X from
// shared memory by ldmatrix.trans, a k-tile pair at a time; fp32 accumulators, the even and odd k-tiles in
// two chains). Up to 3 row tiles a warp holds all of H_m and the warps split the columns; from 4 a warp holds
// one tile's row panel and walks every column. The operands are the row's own 16-bit values and +-1: every
// product is exact, only the fp32 sums round (in the tensor core's adder, not IEEE order, so the results are
// not the CPU kernel's bits: the GPU tests hold this kernel to the float64 reference within DESIGN.md's
// rule). Then the butterflies over Y's p columns in fp32 as the butterfly kernel runs them (bits 0..2 in
// registers, up to 5 by lane shuffles, the rest in shared-memory passes), the scale, one rounding, 16-byte
// stores. Instructions an element drop from about 60 to about 18 at 14336 (the factor's 28 FADDs and 7 LDS
// become 1/32 of an HMMA).
//
// Shared memory a block: Y [m][p + 8] fp32, then X [MP][p + 8] 16-bit (rows m..MP-1 zero: H's padded
// columns are 0, but 0 * NaN is not). The 8-element row padding makes the ldmatrix row reads (rows 2p + 16
// bytes apart) and the accumulator stores (rows g = 0..7 of a fragment) conflict-free. The grid is
// persistent, a block taking rows gridDim.x apart; the next row's X is copied in by cp.async as soon as the
// GEMM has read the current one, so its loads fly during the butterflies and the stores.
#include <cuda_runtime.h>

#include "fusedtune/hadamard_cuda.cuh"
#include "fusedtune/resident_blocks.h"
#include "fusedtune/roste_cuda.h"
#include "fusedtune/vec8.cuh"

namespace fusedtune {
namespace roste {
namespace {

// the m16n8k16 A fragment (row-major) of the factor's tile (mt, kt) for this lane, from h (row-major MP x MP
// 16-bit): a0a1 (row g, cols 2t, 2t + 1), a2a3 (row g + 8), a4a5 (row g, cols + 8), a6a7 (row g + 8, cols + 8);
// g = lane / 4, t = lane % 4 (an element pair is one aligned 32-bit word of h)
template <int MT>
__device__ __forceinline__ void a_fragment(uint32_t a[4], const uint16_t* __restrict__ h, int mt, int kt, int lane) {
  constexpr int MP = 16 * MT;
  const int r = 16 * mt + (lane >> 2), c = 16 * kt + 2 * (lane & 3);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(h);
  a[0] = w[(r * MP + c) / 2];
  a[1] = w[((r + 8) * MP + c) / 2];
  a[2] = w[(r * MP + c + 8) / 2];
  a[3] = w[((r + 8) * MP + c + 8) / 2];
}

// d += a * b, fp32 accumulators
template <int DT>
__device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if __CUDA_ARCH__ >= 800
  if (DT == FT_BF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();   // (never launched: the op refuses devices below sm_80)
#endif
}

// B fragments of X's k-tiles kt and kt + 1 at columns n0..n0 + 7 (X row-major [k][n], row stride `stride`
// elements): ldmatrix.x4.trans of four 8x8 matrices whose rows are k (lane l addresses row 16 kt + l), so lane
// (g, t) gets X[2t, 2t + 1][g] (b0b1) and X[2t + 8, 2t + 9][g] (b2b3) of each k-tile
__device__ __forceinline__ void b_pair(uint32_t b0[2], uint32_t b1[2], const uint16_t* xs, int stride, int kt, int n0,
                                       int lane) {
#if __CUDA_ARCH__ >= 800
  const unsigned addr = (unsigned)__cvta_generic_to_shared(xs + (16 * kt + lane) * stride + n0);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(b0[0]), "=r"(b0[1]), "=r"(b1[0]), "=r"(b1[1])
               : "r"(addr));
#endif
}

// the same for one k-tile (ldmatrix.x2.trans: lanes 0..15 address its rows; the others' addresses repeat them)
__device__ __forceinline__ void b_one(uint32_t b[2], const uint16_t* xs, int stride, int kt, int n0, int lane) {
#if __CUDA_ARCH__ >= 800
  const unsigned addr = (unsigned)__cvta_generic_to_shared(xs + (16 * kt + (lane & 15)) * stride + n0);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
#endif
}

// a radix pass of the butterflies (hadamard_math.h's radix_pass) over Y's padded rows: flat index i of the
// row-major [m, p] is at (i >> log_p) * stride + (i & (p - 1)); a group's 2^R values share a row
template <int R>
__device__ __forceinline__ void radix_pass_rows(float* s, int g, int b, int log_p, int stride) {
  const int base = ((g >> b) << (b + R)) | (g & ((1 << b) - 1));
  radix_group<R>(s + (base >> log_p) * stride + (base & ((1 << log_p) - 1)), b);
}

// a thread's chunks of row xr into X's padded rows, by cp.async (chunk c: flat elements 8c .. 8c + 7)
__device__ __forceinline__ void stage_x(uint16_t* xs, const char* xr, const MmaPlan& pl, int stride) {
  for (int f = threadIdx.x * kE; f < pl.m * pl.p; f += blockDim.x * kE)
    copy16_async(xs + (f >> pl.log_p) * stride + (f & (pl.p - 1)), xr + (int64_t)f * 2);
  commit_copies();
}

// MT = ceil(m / 16) tiles of H_m's rows. A warp holds MW of them (all MT up to 3; one from 4 on, where all of H_m
// would not fit a warp's registers) for all k: G = MT / MW groups of warps, each walking the n-tiles of its
// rows; blockDim.x / 32 is a multiple of G (mma_warps, roste_cuda.h).
template <int DT, int MT>
__global__ void __launch_bounds__(32 * mma_max_warps(MT), 2)
    hadamard_mma_kernel(const void* __restrict__ x, void* __restrict__ out, const uint16_t* __restrict__ h,
                        const MmaPlan pl, float scale, int64_t rows) {
  constexpr int MW = MT <= 3 ? MT : 1, G = MT / MW, MP = 16 * MT;
  extern __shared__ float4 smem4[];
  const int m = pl.m, p = pl.p, n = m * p, stride = p + kMmaPad;
  float* s = reinterpret_cast<float*>(smem4);                          // Y [m][stride]
  uint16_t* xs = reinterpret_cast<uint16_t*>(s + m * stride);          // X [MP][stride] (16-byte aligned)
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int mg = warp % G, nt0 = warp / G, nts = (blockDim.x >> 5) / G;
  int64_t row = blockIdx.x;
  if (row >= rows) return;
  stage_x(xs, static_cast<const char*>(x) + row * n * 2, pl, stride);
  uint32_t a[MW][MT][4];
  FT_UNROLL
  for (int mw = 0; mw < MW; ++mw) {
    FT_UNROLL
    for (int kt = 0; kt < MT; ++kt) a_fragment<MT>(a[mw][kt], h, mg * MW + mw, kt, lane);
  }
  {   // rows m..MP-1 of X: zeros (H's padded columns are 0, but 0 * NaN is not); the copies never reach them
    uint4* pad = reinterpret_cast<uint4*>(xs + m * stride);
    for (int i = t; i < (MP - m) * stride / 8; i += blockDim.x) pad[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  const bool direct = 3 + pl.shfl >= pl.log_p;   // no shared-memory pass: the lane stages end the butterflies
  for (; row < rows; row += gridDim.x) {
    char* orow = static_cast<char*>(out) + row * n * 2;
    wait_copies();
    __syncthreads();   // X landed (every thread's copies); the previous row's reads of Y are done
    for (int nt = nt0; nt < p / 8; nt += nts) {
      float d[MW][2][4];   // the even and the odd k-tiles' sums: two dependent chains of HMMA, not one
      FT_UNROLL
      for (int mw = 0; mw < MW; ++mw) {
        FT_UNROLL
        for (int j = 0; j < 8; ++j) d[mw][j >> 2][j & 3] = 0.0f;
      }
      FT_UNROLL
      for (int kt = 0; kt + 1 < MT; kt += 2) {
        uint32_t b0[2], b1[2];
        b_pair(b0, b1, xs, stride, kt, 8 * nt, lane);
        FT_UNROLL
        for (int mw = 0; mw < MW; ++mw) {
          mma16816<DT>(d[mw][0], a[mw][kt], b0);
          mma16816<DT>(d[mw][1], a[mw][kt + 1], b1);
        }
      }
      if constexpr (MT % 2 == 1) {
        uint32_t b[2];
        b_one(b, xs, stride, MT - 1, 8 * nt, lane);
        FT_UNROLL
        for (int mw = 0; mw < MW; ++mw) mma16816<DT>(d[mw][0], a[mw][MT - 1], b);
      }
      FT_UNROLL
      for (int mw = 0; mw < MW; ++mw) {
        const int r = 16 * (mg * MW + mw) + (lane >> 2), c = 8 * nt + 2 * (lane & 3);
        float y[4];
        FT_UNROLL
        for (int j = 0; j < 4; ++j) y[j] = ft_add(d[mw][0][j], d[mw][1][j]);
        if (r < m) *reinterpret_cast<float2*>(s + r * stride + c) = make_float2(y[0], y[1]);
        if (r + 8 < m) *reinterpret_cast<float2*>(s + (r + 8) * stride + c) = make_float2(y[2], y[3]);
      }
    }
    __syncthreads();   // Y complete, X read: the next row's copies may overwrite X
    if (row + gridDim.x < rows) stage_x(xs, static_cast<const char*>(x) + (row + gridDim.x) * n * 2, pl, stride);
    // chunk c (8 consecutive elements of a Y row) by thread c mod blockDim.x: n / 8 is a multiple of 32 and so
    // is blockDim.x, so a warp's lanes are all in or all out (the shuffles), and lane = c mod 32
    for (int c = t; c < n / kE; c += blockDim.x) {
      const int f = c * kE;
      float4* q = reinterpret_cast<float4*>(s + (f >> pl.log_p) * stride + (f & (p - 1)));
      const float4 lo = q[0], hi = q[1];
      float v[kE] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      butterfly8(v);
      for (int st = 0; st < pl.shfl; ++st) lane_stage(v, lane, st);
      if (direct) {
        store_chunk<DT>(orow, c, v, scale);
      } else {
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    }
    if (!direct) {
      __syncthreads();
      for (int b = 3 + pl.shfl, r; (r = mma_pass_bits(pl, b)) != 0; b += r) {
        for (int g = t; g < (n >> r); g += blockDim.x) {
          if (r == 3) radix_pass_rows<3>(s, g, b, pl.log_p, stride);
          else if (r == 2) radix_pass_rows<2>(s, g, b, pl.log_p, stride);
          else radix_pass_rows<1>(s, g, b, pl.log_p, stride);
        }
        __syncthreads();
      }
      for (int c = t; c < n / kE; c += blockDim.x) {
        const int f = c * kE;
        const float4* q = reinterpret_cast<const float4*>(s + (f >> pl.log_p) * stride + (f & (p - 1)));
        const float4 lo = q[0], hi = q[1];
        const float v[kE] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        store_chunk<DT>(orow, c, v, scale);
      }
    }
  }
}

template <int DT, int MT>
cudaError_t launch_mma(const void* x, void* out, const void* h, int64_t rows, const MmaPlan& pl, float scale,
                       cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(hadamard_mma_kernel<DT, MT>);
  const int smem = mma_smem_bytes(pl.m, pl.p), threads = 32 * mma_warps(pl.m, pl.p);
  int optin = 0;
  int64_t resident = 0;
  cudaError_t err = resident_blocks(kernel, threads, smem, &resident, &optin);
  if (err != cudaSuccess) return err;
  if (smem > optin || resident < 1) return cudaErrorInvalidConfiguration;
  const int64_t grid = rows < resident ? rows : resident;
  hadamard_mma_kernel<DT, MT><<<(unsigned)grid, threads, smem, stream>>>(x, out, static_cast<const uint16_t*>(h),
                                                                        pl, scale, rows);
  return cudaGetLastError();
}

template <int DT>
cudaError_t launch_mma_dtype(const void* x, void* out, const void* h, int64_t rows, const MmaPlan& pl, float scale,
                             cudaStream_t stream) {
  switch ((pl.m + 15) / 16) {   // the tile counts of the factors fusedtune.reference.hadamard ships
    case 1: return launch_mma<DT, 1>(x, out, h, rows, pl, scale, stream);
    case 2: return launch_mma<DT, 2>(x, out, h, rows, pl, scale, stream);
    case 3: return launch_mma<DT, 3>(x, out, h, rows, pl, scale, stream);
    case 4: return launch_mma<DT, 4>(x, out, h, rows, pl, scale, stream);
    case 5: return launch_mma<DT, 5>(x, out, h, rows, pl, scale, stream);
    case 7: return launch_mma<DT, 7>(x, out, h, rows, pl, scale, stream);
    case 9: return launch_mma<DT, 9>(x, out, h, rows, pl, scale, stream);
    case 10: return launch_mma<DT, 10>(x, out, h, rows, pl, scale, stream);
    case 11: return launch_mma<DT, 11>(x, out, h, rows, pl, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_hadamard_mma(const void* x, void* out, const void* h, int64_t rows, const MmaPlan& pl,
                                float scale, int dt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dt) {
    case FT_BF16: return launch_mma_dtype<FT_BF16>(x, out, h, rows, pl, scale, stream);
    case FT_F16: return launch_mma_dtype<FT_F16>(x, out, h, rows, pl, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace roste
}  // namespace fusedtune
