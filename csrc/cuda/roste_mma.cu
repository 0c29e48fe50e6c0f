// RoSTE family: the Hadamard transform of 16-bit factored rows (n = m * p, m one of the compiled factors
// 12..44, p = 2^k) with the factor H_m on tensor cores (hadamard_mma_kernel). The butterfly kernel
// (roste.cu) applies H_m last, on CUDA cores: m adds an element (28 at 14336 = 28 x 512), which with its
// shared-memory reads made it issue-bound at 3.3x a memcpy on an H200 (bench/results/h200_2026-11-30.md).
//
// Here H_m comes first, Y = H_m X with X the row as [m, p], as one mma.sync.m16n8k16 GEMM per row (A = H_m
// zero-padded to MP = 16 * ceil(m / 16), fragments built once per block from hadamard_factors.h's signs and
// kept in registers; B = X from shared memory by ldmatrix.trans; fp32 accumulators). Its operands are the
// row's own 16-bit values and +-1: every product is exact, only the fp32 sums round (in the tensor core's
// adder, not IEEE order, so the results are not the CPU kernel's bits: the GPU tests hold this kernel to
// the float64 reference within DESIGN.md's rule). Then the butterflies over Y's p columns in fp32 as the
// butterfly kernel runs them (bits 0..2 in registers, up to 5 by lane shuffles, the rest in shared-memory
// passes), the scale, one rounding, 16-byte stores. Instructions an element drop from about 60 to about
// 18 at 14336 (the factor's 28 FADDs and 7 LDS become 1/32 of an HMMA).
//
// Shared memory a block: Y [m][p + 8] fp32, then X [MP][p + 8] 16-bit (rows m..MP-1 zero: H's padded
// columns are 0, but 0 * NaN is not). The 8-element row padding makes the ldmatrix row reads (rows 2p + 16
// bytes apart) and the accumulator stores (rows g = 0..7 of a fragment) conflict-free. The grid is
// persistent, a block taking rows gridDim.x apart; the next row's X is copied in by cp.async as soon as the
// GEMM has read the current one, so its loads fly during the butterflies and the stores.
#include <cuda_runtime.h>

#include <utility>

#include "fusedtune/hadamard_cuda.cuh"
#include "fusedtune/resident_blocks.h"
#include "fusedtune/roste_cuda.h"
#include "fusedtune/vec8.cuh"

namespace fusedtune {
namespace roste {
namespace {

// hadamard_factors.h's rows of H_m in constant memory (read with a runtime row index once per block;
// the constexpr function's table would be copied to local memory for that)
template <int M>
struct FactorRows {
  uint64_t r[M];
};
template <int M, int... I>
constexpr FactorRows<M> factor_rows(std::integer_sequence<int, I...>) {
  return FactorRows<M>{{factor_row(M, I)...}};
}
template <int M>
__constant__ FactorRows<M> kFactorRows = factor_rows<M>(std::make_integer_sequence<int, M>{});

// H_m[i, r] (H_m^T's when transpose) as 16-bit bits: +-1, 0 outside m x m (the padding)
template <int DT, int M>
__device__ __forceinline__ uint32_t h_bits(int i, int r, bool transpose) {
  if (i >= M || r >= M) return 0u;
  const uint64_t mask = kFactorRows<M>.r[transpose ? r : i];
  const uint32_t neg = (uint32_t)((mask >> (transpose ? i : r)) & 1u);
  return (DT == FT_BF16 ? 0x3F80u : 0x3C00u) | (neg << 15);
}

// the m16n8k16 A fragment (row-major) of H's tile (mt, kt) for this lane: a0a1 (row g, cols 2t, 2t + 1),
// a2a3 (row g + 8), a4a5 (row g, cols + 8), a6a7 (row g + 8, cols + 8); g = lane / 4, t = lane % 4
template <int DT, int M>
__device__ __forceinline__ void a_fragment(uint32_t a[4], int mt, int kt, int lane, bool transpose) {
  const int r = 16 * mt + (lane >> 2), c = 16 * kt + 2 * (lane & 3);
  const int rows[4] = {r, r + 8, r, r + 8}, cols[4] = {c, c, c + 8, c + 8};
  FT_UNROLL
  for (int j = 0; j < 4; ++j)
    a[j] = h_bits<DT, M>(rows[j], cols[j], transpose) | (h_bits<DT, M>(rows[j], cols[j] + 1, transpose) << 16);
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

// B fragments of X's k-tiles 0..MT-1 at columns n0..n0 + 7 (X row-major [k][n], row stride xs_stride
// elements): ldmatrix.trans of 8x8 matrices whose rows are k, so lane (g, t) gets X[2t, 2t + 1][g] (b0b1) and
// X[2t + 8, 2t + 9][g] (b2b3) of each k-tile; lane l addresses row l (x4: two k-tiles) or l % 16 (x2)
template <int MT>
__device__ __forceinline__ void b_fragments(uint32_t b[MT][2], const uint16_t* xs, int xs_stride, int n0, int lane) {
#if __CUDA_ARCH__ >= 800
  FT_UNROLL
  for (int kt = 0; kt + 1 < MT; kt += 2) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(xs + (16 * kt + lane) * xs_stride + n0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b[kt][0]), "=r"(b[kt][1]), "=r"(b[kt + 1][0]), "=r"(b[kt + 1][1])
                 : "r"(addr));
  }
  if constexpr (MT % 2 == 1) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(xs + (16 * (MT - 1) + (lane & 15)) * xs_stride + n0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b[MT - 1][0]), "=r"(b[MT - 1][1])
                 : "r"(addr));
  }
#endif
}

// a radix pass of the butterflies (hadamard_math.h's radix_pass) over Y's padded rows: flat index i of the
// row-major [m, p] is at (i >> log_p) * stride + (i & (p - 1)); a group's 2^R values share a row
template <int R>
__device__ __forceinline__ void radix_pass_rows(float* s, int g, int b, int log_p, int stride) {
  const int low = g & ((1 << b) - 1);
  const int base = ((g >> b) << (b + R)) | low;
  float* q = s + (base >> log_p) * stride + (base & ((1 << log_p) - 1));
  float v[1 << R];
  FT_UNROLL
  for (int k = 0; k < (1 << R); ++k) v[k] = q[k << b];
  FT_UNROLL
  for (int h = 1; h < (1 << R); h <<= 1) {
    FT_UNROLL
    for (int k = 0; k < (1 << R); ++k) {
      if (!(k & h)) {
        const float x0 = v[k], x1 = v[k + h];
        v[k] = ft_add(x0, x1);
        v[k + h] = ft_sub(x0, x1);
      }
    }
  }
  FT_UNROLL
  for (int k = 0; k < (1 << R); ++k) q[k << b] = v[k];
}

// a thread's chunks of row xr into X's padded rows, by cp.async (chunk c: flat elements 8c .. 8c + 7)
__device__ __forceinline__ void stage_x(uint16_t* xs, const char* xr, const Plan& pl, int stride, int t) {
  for (int it = 0; it < pl.iters; ++it) {
    const int f = (t + it * pl.threads) * kE;
    copy16_async(xs + (f >> pl.log_p) * stride + (f & (pl.p - 1)), xr + (int64_t)f * 2);
  }
  commit_copies();
}

template <int DT, int M>
__global__ void __launch_bounds__(kMaxThreads, M <= 32 ? 2 : 1)
    hadamard_mma_kernel(const void* __restrict__ x, void* __restrict__ out, const Plan pl, float scale,
                        int64_t rows, bool transpose) {
  constexpr int MT = (M + 15) / 16, MP = 16 * MT;
  extern __shared__ float4 smem4[];
  const int p = pl.p, n = M * p, stride = p + kMmaPad;
  float* s = reinterpret_cast<float*>(smem4);                          // Y [M][stride]
  uint16_t* xs = reinterpret_cast<uint16_t*>(s + M * stride);          // X [MP][stride] (16-byte aligned)
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = pl.threads >> 5;
  int64_t row = blockIdx.x;
  if (row >= rows) return;
  uint32_t a[MT][MT][4];
  FT_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    FT_UNROLL
    for (int kt = 0; kt < MT; ++kt) a_fragment<DT, M>(a[mt][kt], mt, kt, lane, transpose);
  }
  if constexpr (MP > M) {
    uint4* pad = reinterpret_cast<uint4*>(xs + M * stride);
    for (int i = t; i < (MP - M) * stride / 8; i += pl.threads) pad[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  stage_x(xs, static_cast<const char*>(x) + row * n * 2, pl, stride, t);
  const bool direct = 3 + pl.shfl >= pl.log_p;   // no shared-memory pass: the lane stages end the butterflies
  for (; row < rows; row += gridDim.x) {
    char* orow = static_cast<char*>(out) + row * n * 2;
    wait_copies();
    __syncthreads();   // X landed (every thread's copies); the previous row's reads of Y are done
    for (int nt = warp; nt < p / 8; nt += warps) {
      uint32_t b[MT][2];
      b_fragments<MT>(b, xs, stride, 8 * nt, lane);
      FT_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        FT_UNROLL
        for (int kt = 0; kt < MT; ++kt) mma16816<DT>(d, a[mt][kt], b[kt]);
        const int r = 16 * mt + (lane >> 2), c = 8 * nt + 2 * (lane & 3);
        if (r < M) *reinterpret_cast<float2*>(s + r * stride + c) = make_float2(d[0], d[1]);
        if (r + 8 < M) *reinterpret_cast<float2*>(s + (r + 8) * stride + c) = make_float2(d[2], d[3]);
      }
    }
    __syncthreads();   // Y complete, X read: the next row's copies may overwrite X
    if (row + gridDim.x < rows) stage_x(xs, static_cast<const char*>(x) + (row + gridDim.x) * n * 2, pl, stride, t);
    for (int it = 0; it < pl.iters; ++it) {
      const int c = t + it * pl.threads, f = c * kE;
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
      for (int b = 3 + pl.shfl, r; (r = pass_bits(pl, b)) != 0; b += r) {
        for (int g = t; g < (n >> r); g += pl.threads) {
          if (r == 3) radix_pass_rows<3>(s, g, b, pl.log_p, stride);
          else if (r == 2) radix_pass_rows<2>(s, g, b, pl.log_p, stride);
          else radix_pass_rows<1>(s, g, b, pl.log_p, stride);
        }
        __syncthreads();
      }
      for (int it = 0; it < pl.iters; ++it) {
        const int c = t + it * pl.threads, f = c * kE;
        const float4* q = reinterpret_cast<const float4*>(s + (f >> pl.log_p) * stride + (f & (p - 1)));
        const float4 lo = q[0], hi = q[1];
        const float v[kE] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        store_chunk<DT>(orow, c, v, scale);
      }
    }
  }
}

template <int DT, int M>
cudaError_t launch_mma(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                       cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(hadamard_mma_kernel<DT, M>);
  const int smem = mma_smem_bytes(M, pl.p);
  int optin = 0;
  int64_t resident = 0;
  cudaError_t err = resident_blocks(kernel, pl.threads, smem, &resident, &optin);
  if (err != cudaSuccess) return err;
  if (smem > optin || resident < 1) return cudaErrorInvalidConfiguration;
  const int64_t grid = rows < resident ? rows : resident;
  hadamard_mma_kernel<DT, M><<<(unsigned)grid, pl.threads, smem, stream>>>(x, out, pl, scale, rows, transpose);
  return cudaGetLastError();
}

template <int DT>
cudaError_t launch_mma_dtype(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                             cudaStream_t stream) {
  switch (pl.m) {
    case 12: return launch_mma<DT, 12>(x, out, rows, pl, transpose, scale, stream);
    case 28: return launch_mma<DT, 28>(x, out, rows, pl, transpose, scale, stream);
    case 36: return launch_mma<DT, 36>(x, out, rows, pl, transpose, scale, stream);
    case 40: return launch_mma<DT, 40>(x, out, rows, pl, transpose, scale, stream);
    case 44: return launch_mma<DT, 44>(x, out, rows, pl, transpose, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_hadamard_mma(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                                int dt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dt) {
    case FT_BF16: return launch_mma_dtype<FT_BF16>(x, out, rows, pl, transpose, scale, stream);
    case FT_F16: return launch_mma_dtype<FT_F16>(x, out, rows, pl, transpose, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace roste
}  // namespace fusedtune
