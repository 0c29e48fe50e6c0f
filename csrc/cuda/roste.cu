// RoSTE family, CUDA kernels of the butterfly Hadamard transform (the stage plan and arithmetic of
// hadamard_math.h). Power-of-two rows of 256..4096: one warp per row, the row staged in shared memory by
// cp.async, then all in registers and shuffles (hadamard_warp_kernel). Otherwise one block per row; bits
// 0..2 in registers, the next up to 5 bits by warp shuffles, the rest in shared memory (the row in fp32,
// n * 4 bytes), then the factor H_m (H_m^T for the backward) as n / 4 items of 4 outputs, 2 * iters a
// thread: an item reads its column's m values from shared memory and sums them with the signs compiled in
// (hadamard_factors.h: one FADD a term, four independent sums), then the scale, one rounding to the output
// dtype. Loads (and the stores of m = 1) move 8 consecutive elements per thread as 16-byte vectors; out is
// a fresh allocation (aligned).
//
// The factor stage before (sm_90a SASS, m = 28): signs from a runtime mask cost an R2P a 7 terms and two
// predicated FADDs a term in one dependent chain, and a thread took a whole column: at 14336 = 28 x 512,
// 448 threads for 512 columns, so the second round ran 64 threads (8.0x a memcpy on an H200, triton 3.3x).
//
// The storage dtype is a template argument, and loads are issued ahead of the arithmetic (the warp kernel:
// all of a row's copies before one wait; the block kernel: groups of 4 chunks, 2 for fp32). With the
// dtype a runtime value, each chunk's conversion branched (fp16 subnormals) and ptxas issued chunk i + 1's
// load only after chunk i's data had arrived: 16 serial memory round trips per row in the 4096 warp
// kernel (3.1x a memcpy on an H200, bench/results/roste.csv).
// Conversions on sm_80+ are the hardware's round-to-nearest-even (cvt.rn.bf16x2/f16x2.f32: the same
// bits as common.h's integer rounding for every non-NaN value; a NaN comes out as the hardware's
// canonical NaN, where the CPU kernel keeps the sign: the GPU's fp32 adds had already made it canonical).
// A lane stage is one FMA: fma(mine, +-1, partner) is partner + mine or partner - mine rounded once,
// the same bits as lane_combine's add or subtract (the product by +-1 is exact; x - y is x + (-y)).
#include <cuda_runtime.h>

#include "fusedtune/hadamard_cuda.cuh"
#include "fusedtune/resident_blocks.h"
#include "fusedtune/roste_cuda.h"
#include "fusedtune/vec8.cuh"

namespace fusedtune {
namespace roste {

static_assert(kE == kVec8, "a Hadamard chunk is vec8.cuh's chunk");

constexpr int kMaxIters = 8;   // chunks a thread in the block kernel (every size make_plan serves: at most 8)

// one value rounded to nearest even into a 16-bit dtype (the bits in the low half): pack2's conversion
template <int DT>
__device__ __forceinline__ uint16_t round16(float v) {
  return (uint16_t)pack2<DT>(v, 0.0f);
}

// chunk c = t + it * threads (it < iters) of a row: its butterfly8 and lane stages, into s
template <int DT>
__device__ __forceinline__ void first_stages(const Raw<DT>& raw, const Plan& pl, float* s, int64_t c, int lane) {
  float v[kE];
  unpack<DT>(raw, v);
  butterfly8(v);
  for (int st = 0; st < pl.shfl; ++st) lane_stage(v, lane, st);
  float4* d = reinterpret_cast<float4*>(s + c * kE);
  d[0] = make_float4(v[0], v[1], v[2], v[3]);
  d[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// a thread's chunks of a row into its own slots of the staging buffer (slot c for chunk c), by cp.async
template <int DT>
__device__ __forceinline__ void stage_row(const char* xr, const Plan& pl, uint4* stage, int t) {
  constexpr int kV = DT == FT_F32 ? 2 : 1;
  for (int it = 0; it < pl.iters; ++it) {
    const int64_t c = t + (int64_t)it * pl.threads;
    copy_chunk_async<kV>(stage + c * kV, xr + c * kV * 16);
  }
}

// The grid is persistent (the blocks that fit the GPU at once), a block taking rows gridDim.x apart. With
// staged (the launch's choice: the staging buffer, n * dtype bytes after the fp32 row, leaves as many blocks
// an SM), a thread copies its chunks of the block's next row into its own staging slots by cp.async as
// soon as it has read the current row's, so the next row's loads fly during the shared-memory passes and
// the factor stage; else each row's chunks are loaded into registers in groups (below). One row a block,
// loaded only when the block started, left an SM's loads idle during its blocks' arithmetic: 2.6x / 3.0x a
// memcpy at 3584 / 5120 on an H200 (fourth run), with the factor stage's ~12 us of FADD an SM at 3584
// against the copy's 20.
// (2 blocks' worth of registers for the factored kernels, 64 a thread: with 1 the persistent loop took 71 at
// m = 28, which leaves 2 blocks of 448 threads an SM instead of 3; it compiles to 48, as before the loop)
template <int DT, int M, bool T>
__global__ void __launch_bounds__(kMaxThreads, M == 1 ? 3 : 2)
    hadamard_kernel(const void* __restrict__ x, void* __restrict__ out, const Plan pl, float scale, int64_t rows,
                    bool staged) {
  extern __shared__ float4 smem4[];
  float* s = reinterpret_cast<float*>(smem4);
  const int n = pl.m * pl.p;
  uint4* stage = reinterpret_cast<uint4*>(s + n);   // (n is a multiple of 256: 16-byte aligned)
  constexpr int64_t esize = DT == FT_F32 ? 4 : 2;
  constexpr int kV = DT == FT_F32 ? 2 : 1;
  const int t = threadIdx.x, lane = t & 31;
  int64_t row = blockIdx.x;
  if (row >= rows) return;
  if (staged) {
    stage_row<DT>(static_cast<const char*>(x) + row * n * esize, pl, stage, t);
    commit_copies();
  }
  for (; row < rows; row += gridDim.x) {
    const char* xr = static_cast<const char*>(x) + row * n * esize;
    char* orow = static_cast<char*>(out) + row * n * esize;
    if (staged) {
      wait_copies();
      for (int it = 0; it < pl.iters; ++it) {
        const int64_t c = t + (int64_t)it * pl.threads;
        Raw<DT> raw;
        FT_UNROLL
        for (int k = 0; k < kV; ++k) raw.q[k] = stage[c * kV + k];
        first_stages<DT>(raw, pl, s, c, lane);
      }
      // the slots are re-filled after this thread's reads of them, in program order (the copies' "memory"
      // clobber keeps the reads above; a copy's write lands when its global load returns)
      if (row + gridDim.x < rows) {
        stage_row<DT>(xr + (int64_t)gridDim.x * n * esize, pl, stage, t);
        commit_copies();
      }
    } else {
      // loads in groups of kGroup chunks a thread (16 registers of raw data), all issued before the group's
      // arithmetic; iters <= kMaxIters, so at most 4 groups (2 for 16-bit dtypes)
      constexpr int kGroup = DT == FT_F32 ? 2 : 4;
      FT_UNROLL
      for (int g0 = 0; g0 < kMaxIters; g0 += kGroup) {
        if (g0 >= pl.iters) break;
        Raw<DT> raw[kGroup];
        FT_UNROLL
        for (int k = 0; k < kGroup; ++k)
          if (g0 + k < pl.iters) raw[k] = load_raw<DT>(xr, t + (int64_t)(g0 + k) * pl.threads);
        FT_UNROLL
        for (int k = 0; k < kGroup; ++k) {
          if (g0 + k >= pl.iters) break;
          first_stages<DT>(raw[k], pl, s, t + (int64_t)(g0 + k) * pl.threads, lane);
        }
      }
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
    if (M == 1) {                               // kE elements per thread: one 16-byte store (two for fp32)
      for (int c = t; c < n / kE; c += pl.threads) store_chunk<DT>(orow, c, s + c * kE, scale);
    } else {                                    // n / 4 factor items: 2 * iters a thread, every thread busy
      for (int it = t; it < n / kFactorOut; it += pl.threads) {
        const int q = it >> pl.log_p, j = it & (pl.p - 1);   // a warp's items share q when p >= 32
        float y[kFactorOut];
        factor_outputs<M, T>(s, pl.p, j, q, scale, y);
        FT_UNROLL
        for (int k = 0; k < kFactorOut; ++k) {
          const int64_t i = (int64_t)(kFactorOut * q + k) * pl.p + j;
          if constexpr (DT == FT_F32) reinterpret_cast<float*>(orow)[i] = y[k];
          else reinterpret_cast<uint16_t*>(orow)[i] = round16<DT>(y[k]);
        }
      }
    }
    __syncthreads();                            // s is read before the next row's first stages write it
  }
}

// Rows of n = p = 256 * C elements (C = 1..16), one warp per row: lane l holds chunks l + 32 i (i < C), so
// element bits 0..2 are a chunk's registers, bits 3..7 the lane (shuffles) and bits 8.. the chunk number i
// (registers again). The stages run on bits 0, 1, 2, ... in the same order and with the same adds as the
// block kernel's plan (radix passes are radix-2 stages in bit order), so the results are the same bits.
// The row comes in through shared memory by cp.async (sm_80+): a lane starts all of its C 16-byte copies
// (2C for fp32; consecutive lanes copy consecutive vectors), waits once, and reads back its chunks (for
// 16-bit rows the vectors it copied itself; fp32 after a __syncwarp, no block barrier). Plain loads of the
// same vectors into registers were sunk by ptxas next to their first use (to save registers), which left
// about 3 of a lane's 16 loads in flight; 4 warps a block, several blocks an SM.
// The grid is persistent (the blocks that fit the GPU at once), each warp taking rows gridDim.x * 4 apart:
// once a row is in registers, the warp starts the copies of its next row into the same shared memory and
// then transforms and stores the current one, so a row's loads are in flight during the previous row's
// arithmetic. One row a warp (a grid over the rows) left each warp's loads idle while it computed: at
// 4096 x 4096 bf16 on an H200 that was 1.31x a memcpy (bench/results/h200_2026-11-30.md, fourth run),
// with ~10 us of shuffle and arithmetic issue an SM against the copy's 21.
constexpr int kWarpRows = 4;   // warps per block

template <int DT, int C>
constexpr int warp_smem_bytes() {
  return kWarpRows * 256 * C * (DT == FT_F32 ? 4 : 2);
}

template <int DT, int C>
__global__ void __launch_bounds__(32 * kWarpRows) hadamard_warp_kernel(const void* __restrict__ x,
                                                                        void* __restrict__ out, int64_t rows,
                                                                        float scale) {
  extern __shared__ uint4 stage[];
  constexpr int n = 256 * C;
  constexpr int kV = DT == FT_F32 ? 2 : 1;      // 16-byte vectors a chunk
  constexpr int64_t vecs = n * kV / kE;         // 16-byte vectors a row
  const int64_t stride = (int64_t)gridDim.x * kWarpRows;
  int64_t row = (int64_t)blockIdx.x * kWarpRows + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  uint4* mine = stage + (threadIdx.x >> 5) * vecs;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  FT_UNROLL
  for (int j = 0; j < C * kV; ++j) copy16_async(mine + lane + 32 * j, xv + row * vecs + lane + 32 * j);   // 512 B a warp
  commit_copies();
  for (; row < rows; row += stride) {
    wait_copies();
    if (kV > 1) __syncwarp();   // fp32: chunk c is vectors 2c, 2c + 1, copied by two other lanes
    float v[C][kE];
    FT_UNROLL
    for (int i = 0; i < C; ++i) {
      Raw<DT> r;
      FT_UNROLL
      for (int k = 0; k < kV; ++k) r.q[k] = mine[(lane + 32 * i) * kV + k];
      unpack<DT>(r, v[i]);
      butterfly8(v[i]);
    }
    const int64_t next = row + stride;          // the next row's copies, into the buffer just read
    if (next < rows) {
      if (kV > 1) __syncwarp();                 // (fp32: every lane's reads of the vectors others overwrite)
      FT_UNROLL
      for (int j = 0; j < C * kV; ++j) copy16_async(mine + lane + 32 * j, xv + next * vecs + lane + 32 * j);
      commit_copies();
    }
    FT_UNROLL
    for (int st = 0; st < 5; ++st) {
      FT_UNROLL
      for (int i = 0; i < C; ++i) lane_stage(v[i], lane, st);
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
    char* orow = static_cast<char*>(out) + row * n * (DT == FT_F32 ? 4 : 2);
    FT_UNROLL
    for (int i = 0; i < C; ++i) store_chunk<DT>(orow, lane + 32 * i, v[i], scale);
  }
}

template <int DT, int C>
cudaError_t launch_warp(const void* x, void* out, int64_t rows, float scale, cudaStream_t stream) {
  constexpr int smem = warp_smem_bytes<DT, C>();   // (fp32 at 4096: 64 KB, past the default 48)
  int64_t resident = 0;
  cudaError_t err =
      resident_blocks(reinterpret_cast<const void*>(hadamard_warp_kernel<DT, C>), 32 * kWarpRows, smem, &resident);
  if (err != cudaSuccess) return err;
  if (resident < 1) resident = 1;
  const int64_t need = (rows + kWarpRows - 1) / kWarpRows;
  const int64_t blocks = need < resident ? need : resident;
  hadamard_warp_kernel<DT, C><<<(unsigned)blocks, 32 * kWarpRows, smem, stream>>>(x, out, rows, scale);
  return cudaGetLastError();
}

// The block kernel: staged where the staging buffer (n * dtype bytes) leaves as many blocks an SM as the
// fp32 row alone (shared memory, registers and threads all counted by the occupancy query).
template <int DT, int M, bool T = false>
cudaError_t launch(const void* x, void* out, int64_t rows, const Plan& pl, float scale, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(hadamard_kernel<DT, M, T>);
  const int n = pl.m * pl.p, plain = n * (int)sizeof(float), with_stage = plain + n * (DT == FT_F32 ? 4 : 2);
  int optin = 0;
  int64_t blocks_plain = 0, blocks_staged = 0;
  cudaError_t err = resident_blocks(kernel, pl.threads, plain, &blocks_plain, &optin);
  if (err == cudaSuccess && with_stage <= optin) err = resident_blocks(kernel, pl.threads, with_stage, &blocks_staged);
  if (err != cudaSuccess) return err;
  const bool staged = blocks_staged > 0 && blocks_staged >= blocks_plain;
  const int64_t fit = staged ? blocks_staged : (blocks_plain > 0 ? blocks_plain : 1);
  const int64_t grid = rows < fit ? rows : fit;
  hadamard_kernel<DT, M, T><<<(unsigned)grid, pl.threads, staged ? with_stage : plain, stream>>>(x, out, pl, scale,
                                                                                                 rows, staged);
  return cudaGetLastError();
}

// H_m or, for the backward, H_m^T (the same kernel when H_m is symmetric)
template <int DT, int M>
cudaError_t launch_factor(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                          cudaStream_t stream) {
  if constexpr (!factor_symmetric(M)) {
    if (transpose) return launch<DT, M, true>(x, out, rows, pl, scale, stream);
  }
  return launch<DT, M>(x, out, rows, pl, scale, stream);
}

template <int DT>
cudaError_t launch_dtype(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                         cudaStream_t stream) {
  if (pl.m == 1 && pl.p >= 256 && pl.p <= 4096) {   // a row in one warp's registers
    switch (pl.p) {
      case 256: return launch_warp<DT, 1>(x, out, rows, scale, stream);
      case 512: return launch_warp<DT, 2>(x, out, rows, scale, stream);
      case 1024: return launch_warp<DT, 4>(x, out, rows, scale, stream);
      case 2048: return launch_warp<DT, 8>(x, out, rows, scale, stream);
      default: return launch_warp<DT, 16>(x, out, rows, scale, stream);
    }
  }
  if (pl.iters > kMaxIters) return cudaErrorInvalidValue;
  switch (pl.m) {
    case 1: return launch<DT, 1>(x, out, rows, pl, scale, stream);
    case 12: return launch_factor<DT, 12>(x, out, rows, pl, transpose, scale, stream);
    case 28: return launch_factor<DT, 28>(x, out, rows, pl, transpose, scale, stream);
    case 36: return launch_factor<DT, 36>(x, out, rows, pl, transpose, scale, stream);
    case 40: return launch_factor<DT, 40>(x, out, rows, pl, transpose, scale, stream);
    case 44: return launch_factor<DT, 44>(x, out, rows, pl, transpose, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                            int dt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dt) {
    case FT_F32: return launch_dtype<FT_F32>(x, out, rows, pl, transpose, scale, stream);
    case FT_BF16: return launch_dtype<FT_BF16>(x, out, rows, pl, transpose, scale, stream);
    case FT_F16: return launch_dtype<FT_F16>(x, out, rows, pl, transpose, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace roste
}  // namespace fusedtune
