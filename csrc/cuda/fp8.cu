// FP8 family, CUDA kernel of the 1x128 and 128x128 quantizers (the rules of fp8_math.h, the same bytes as
// the CPU kernel and the reference). A block of 256 threads takes 128x128 tiles (a persistent grid);
// thread (rg, cg) = (t / 16, t % 16) holds rows 8 rg .. 8 rg + 7 at columns 8 cg .. 8 cg + 7 as eight
// 16-byte vectors (two each for fp32), copied by cp.async into its own slots of a staging buffer (32 KB
// a bf16 tile), the next tile's copies started as soon as the current one is in registers: a tile's
// loads in flight a block at all times, 2 or 3 blocks an SM. The values stay packed in their storage
// dtype (an exact conversion to fp32 at each use: fewer registers).
//   row maxima: a thread's 8 columns, then the 16 lanes of its half-warp (shuffles);
//   column maxima: a thread's 8 rows, the other half-warp (a shuffle), then the 8 warps (shared memory);
//   row-wise copy: 8 bytes a row a thread, a half-warp writes 128 consecutive bytes of a row;
//   column-wise copy [K, M]: each thread packs a column's 8 bytes (its 8 rows) into shared memory as
//     tileT[k][granule rg], the granule XOR-swizzled with k / 8 (cg) so a warp's 8-byte stores hit 32
//     distinct banks; read back as 128 rows of k x 16 granules, 8-byte stores of 8 consecutive m.
// E4M3 conversion: sm_89+ cvt.rn.satfinite.e4m3x2.f32 (round to nearest even, saturation: the bytes of
// fp8::e4m3_bits for every finite value; blocks with inf or NaN have a NaN scale and every byte NaN, as
// the reference), older GPUs the integer path. x / s: x times the rounded reciprocal, and the IEEE
// division where that could change the byte (fp8_math.h's e4m3_quotient; the division alone was ~10
// instructions an element and copy with its range check and branch: ~40% of the kernel's issue).
#include <cuda_runtime.h>

#include "fusedtune/fp8_cuda.h"
#include "fusedtune/fp8_math.h"
#include "fusedtune/resident_blocks.h"
#include "fusedtune/vec8.cuh"

namespace fusedtune {
namespace fp8 {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;    // rows a thread (and columns: one chunk)
// Tiles staged through shared memory by cp.async (the kernel below), except on sm_89: its 100 KB an SM
// would hold one block of 52 KB, so there a thread loads its vectors into registers, all before any use
// (launch3 passes no staging buffer to code compiled for compute_89: staging_bytes).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 890
constexpr bool kStaged = false;
#else
constexpr bool kStaged = true;
#endif

// two values -> two E4M3 bytes in the low 16 bits (lo in bits 0..7)
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
  unsigned short d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return e4m3_bits(lo) | (e4m3_bits(hi) << 8);
#endif
}

// eight values over one scale s (r = quotient_rcp(s)) as E4M3 bytes, packed little-endian into two words:
// the reciprocal quotients, or the IEEE divisions for all eight where one of them needs it (fp8_math.h's
// e4m3_quotient per element, with one branch a group: rare on real data)
__device__ __forceinline__ uint2 quant8(const float v[kRows], float s, float r) {
  float q[kRows];
  bool divide = r == 0.0f;
  FT_UNROLL
  for (int i = 0; i < kRows; ++i) {
    q[i] = ft_mul(v[i], r);
    divide |= quotient_needs_division(q[i]);
  }
  if (divide) {
    FT_UNROLL
    for (int i = 0; i < kRows; ++i) q[i] = ft_div(v[i], s);
  }
  uint32_t w[2];
  FT_UNROLL
  for (int h = 0; h < 2; ++h)
    w[h] = e4m3x2(q[4 * h], q[4 * h + 1]) | (e4m3x2(q[4 * h + 2], q[4 * h + 3]) << 16);
  return make_uint2(w[0], w[1]);
}

template <int DT>
constexpr int stage_bytes() {                   // a block's staged tile: 8 chunks a thread
  return kRows * kThreads * (DT == FT_F32 ? 32 : 16);
}

// the tile's 128 x 128 geometry and a thread's part of it
struct Tile {
  int64_t mb, kb, m0, k0;
  int rows, cols;
  bool active;                                  // the thread's 8 x 8 elements exist (M, K multiples of 8)
};

__device__ __forceinline__ Tile tile_at(const QuantArgs& a, int64_t tile, int64_t KB, int cg, int rg) {
  Tile g;
  g.mb = tile / KB;
  g.kb = tile % KB;
  g.m0 = g.mb * kTile;
  g.k0 = g.kb * kTile;
  g.rows = (int)min((int64_t)kTile, a.M - g.m0);
  g.cols = (int)min((int64_t)kTile, a.K - g.k0);
  g.active = rg * kRows < g.rows && cg * kVec8 < g.cols;
  return g;
}

// a thread's 8 chunks of a tile into its own slots of the staging buffer (slot p * 256 + t), by cp.async
template <int DT>
__device__ __forceinline__ void stage_tile(const QuantArgs& a, const Tile& g, int cg, int rg, uint4* stage) {
  constexpr int kV = DT == FT_F32 ? 2 : 1;
  constexpr int64_t es = DT == FT_F32 ? 4 : 2;
  if (!g.active) return;
  const char* xb = static_cast<const char*>(a.x) + ((g.m0 + rg * kRows) * a.ld + g.k0 + cg * kVec8) * es;
  FT_UNROLL
  for (int p = 0; p < kRows; ++p) {
    copy_chunk_async<kV>(stage + (p * kThreads + threadIdx.x) * kV, xb + p * a.ld * es);
  }
}

// One tile from the thread's 8 x 8 elements (zeros where they do not exist): its scales, its row-wise bytes
// and (COPY) its column-wise (BLOCK: transposed) bytes, through tile_t; colmax4 for the column maxima.
template <int DT, bool BLOCK, bool COPY>
__device__ __forceinline__ void quant_tile(const QuantArgs& a, const Tile& tg, const Raw<DT> (&raw)[kRows],
                                           uint2* tile_t, uint4 (*colmax4)[kTile / 4], int64_t KB, int64_t MB) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, cg = t & 15, rg = t >> 4;
  const int64_t mb = tg.mb, kb = tg.kb, m0 = tg.m0, k0 = tg.k0;
  const int rows = tg.rows, cols = tg.cols;
  const bool active = tg.active;
  uint32_t cmax[kVec8];
  FT_UNROLL
  for (int e = 0; e < kVec8; ++e) {
    cmax[e] = 0;
    FT_UNROLL
    for (int p = 0; p < kRows; ++p) cmax[e] = max(cmax[e], mag_bits(raw_elem<DT>(raw[p], e)));
  }
  FT_UNROLL
  for (int e = 0; e < kVec8; ++e) cmax[e] = max(cmax[e], __shfl_xor_sync(0xffffffffu, cmax[e], 16));
  if (lane < 16) {
    colmax4[warp][2 * cg] = make_uint4(cmax[0], cmax[1], cmax[2], cmax[3]);
    colmax4[warp][2 * cg + 1] = make_uint4(cmax[4], cmax[5], cmax[6], cmax[7]);
  }
  __syncthreads();
  FT_UNROLL
  for (int w = 0; w < kThreads / 32; ++w) {
    const uint4 lo = colmax4[w][2 * cg], hi = colmax4[w][2 * cg + 1];
    const uint32_t c[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    FT_UNROLL
    for (int e = 0; e < kVec8; ++e) cmax[e] = max(cmax[e], c[e]);
  }

  // the column-wise copy first (its scales die before the row scales are made: fewer live registers)
  if constexpr (COPY && !BLOCK) {
    FT_UNROLL
    for (int e = 0; e < kVec8; ++e) {
      const float sc = block_scale(__uint_as_float(cmax[e]), a.pow2);
      if (rg == 0 && cg * kVec8 + e < cols) a.sc[(k0 + cg * kVec8 + e) * MB + mb] = sc;
      float v[kRows];
      FT_UNROLL
      for (int p = 0; p < kRows; ++p) v[p] = raw_elem<DT>(raw[p], e);
      tile_t[(cg * kVec8 + e) * 16 + (rg ^ cg)] = quant8(v, sc, quotient_rcp(sc));
    }
  }
  float srow[kRows];
  if constexpr (BLOCK) {
    uint32_t all = 0;
    FT_UNROLL
    for (int e = 0; e < kVec8; ++e) all = max(all, cmax[e]);
    FT_UNROLL
    for (int off = 1; off < 16; off <<= 1) all = max(all, __shfl_xor_sync(0xffffffffu, all, off));
    const float sb = block_scale(__uint_as_float(all), a.pow2);
    if (t == 0) a.s[mb * KB + kb] = sb;
    FT_UNROLL
    for (int p = 0; p < kRows; ++p) srow[p] = sb;
  } else {
    FT_UNROLL
    for (int p = 0; p < kRows; ++p) {       // (the row maxima only now: fewer live registers in the copy above)
      uint32_t rmax = 0;
      FT_UNROLL
      for (int e = 0; e < kVec8; ++e) rmax = max(rmax, mag_bits(raw_elem<DT>(raw[p], e)));
      FT_UNROLL
      for (int off = 1; off < 16; off <<= 1) rmax = max(rmax, __shfl_xor_sync(0xffffffffu, rmax, off));
      srow[p] = block_scale(__uint_as_float(rmax), a.pow2);
      if (cg == 0 && rg * kRows + p < rows) a.s[(m0 + rg * kRows + p) * KB + kb] = srow[p];
    }
  }

  const float rrow0 = quotient_rcp(srow[0]);   // (block: one scale, one reciprocal)
  uint8_t* qb = a.q + (m0 + rg * kRows) * a.K + k0 + cg * kVec8;
  uint2 qrow[kRows];
  FT_UNROLL
  for (int p = 0; p < kRows; ++p) {
    float v[kVec8];
    FT_UNROLL
    for (int e = 0; e < kVec8; ++e) v[e] = raw_elem<DT>(raw[p], e);
    qrow[p] = quant8(v, srow[p], BLOCK ? rrow0 : quotient_rcp(srow[p]));
    if (active) *reinterpret_cast<uint2*>(qb + p * a.K) = qrow[p];
  }
  if constexpr (COPY) {
    if constexpr (BLOCK) {       // the same bytes, transposed: byte e of row p -> byte p of column e
      FT_UNROLL
      for (int e = 0; e < kVec8; ++e) {
        uint32_t w[2] = {0, 0};
        FT_UNROLL
        for (int p = 0; p < kRows; ++p) {
          const uint32_t word = e < 4 ? qrow[p].x : qrow[p].y;
          w[p >> 2] |= ((word >> (8 * (e & 3))) & 0xFFu) << (8 * (p & 3));
        }
        tile_t[(cg * kVec8 + e) * 16 + (rg ^ cg)] = make_uint2(w[0], w[1]);
      }
    }
    __syncthreads();
    FT_UNROLL
    for (int i = 0; i < kTile * 16 / kThreads; ++i) {
      const int idx = t + kThreads * i, k = idx >> 4, g = idx & 15;
      if (k < cols && g * kRows < rows)
        *reinterpret_cast<uint2*>(a.qc + (k0 + k) * a.M + m0 + g * kRows) = tile_t[k * 16 + (g ^ (k >> 3))];
    }
  }
}

template <int DT, bool BLOCK, bool COPY>
// 2 blocks an SM (128 registers) with the column-wise copy or fp32 input, 3 (80) otherwise: the copy at 80
// registers kept IEEE division's slow-path subroutine on the stack (python -m fusedtune kernels).
// Persistent: the grid is the blocks that fit the GPU at once, each taking tiles gridDim.x apart; once a
// tile is in registers the block starts copying its next tile into the staging buffer (each thread its
// own slots: no barrier), so the loads of one tile fly while the previous one is converted and stored.
__global__ void __launch_bounds__(kThreads, COPY || DT == FT_F32 ? 2 : 3) quant_kernel(const QuantArgs a) {
  extern __shared__ uint4 stage[];                             // stage_bytes<DT>()
  __shared__ uint2 tile_t[COPY ? kTile * kTile / 8 : 1];       // [k][16 granules of 8 rows], swizzled
  __shared__ uint4 colmax4[kThreads / 32][kTile / 4];          // per warp, per column
  constexpr int kV = DT == FT_F32 ? 2 : 1;
  const int64_t KB = (a.K + kTile - 1) / kTile, MB = (a.M + kTile - 1) / kTile, tiles = KB * MB;
  const int t = threadIdx.x, cg = t & 15, rg = t >> 4;
  int64_t tile = blockIdx.x;
  if (tile >= tiles) return;
  if constexpr (kStaged) {
    stage_tile<DT>(a, tile_at(a, tile, KB, cg, rg), cg, rg, stage);
    commit_copies();
  }
  for (; tile < tiles; tile += gridDim.x) {
    const Tile tg = tile_at(a, tile, KB, cg, rg);
    if constexpr (kStaged) wait_copies();
    Raw<DT> raw[kRows];
    if constexpr (kStaged) {
      FT_UNROLL
      for (int p = 0; p < kRows; ++p) {
        FT_UNROLL
        for (int k = 0; k < kV; ++k)
          raw[p].q[k] = tg.active ? stage[(p * kThreads + t) * kV + k] : make_uint4(0, 0, 0, 0);
      }
      // each thread re-fills only the slots it just read, after reading them in program order (the copies'
      // "memory" clobber keeps the reads above them; a copy's write lands when its global load returns)
      if (tile + gridDim.x < tiles) {
        stage_tile<DT>(a, tile_at(a, tile + gridDim.x, KB, cg, rg), cg, rg, stage);
        commit_copies();
      }
    } else {
      constexpr int64_t es = DT == FT_F32 ? 4 : 2;
      const char* xb =
          static_cast<const char*>(a.x) + ((tg.m0 + rg * kRows) * a.ld + tg.k0 + cg * kVec8) * es;
      FT_UNROLL
      for (int p = 0; p < kRows; ++p) {
        if (tg.active) {
          raw[p] = load_raw<DT>(xb + p * a.ld * es, 0);
        } else {
          FT_UNROLL
          for (int k = 0; k < kV; ++k) raw[p].q[k] = make_uint4(0, 0, 0, 0);
        }
      }
    }
    quant_tile<DT, BLOCK, COPY>(a, tg, raw, tile_t, colmax4, KB, MB);
    __syncthreads();                            // colmax4 and tile_t are read before the next tile writes them
  }
}

// The staging buffer's bytes for `kernel` on the current device: none where the code that runs there was
// compiled for compute_89 (kStaged false), asked once per device. The kernel's own virtual architecture
// (ptxVersion, what __CUDA_ARCH__ was) decides, not the device's: an sm_80 binary (or compute_80 PTX) that
// runs on an 8.9 device stages its tiles and must get the buffer.
inline cudaError_t staging_bytes(const void* kernel, int stage, int* out) {
  static int cache[64] = {};                    // 1: staged, 2: not (0: not asked yet); a benign race, one value
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && cache[dev] > 0) {
    *out = cache[dev] == 1 ? stage : 0;
    return cudaSuccess;
  }
  cudaFuncAttributes fa;
  err = cudaFuncGetAttributes(&fa, kernel);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  const bool staged = fa.ptxVersion != 89;
  *out = staged ? stage : 0;
  if (dev < 64) cache[dev] = staged ? 1 : 2;
  return cudaSuccess;
}

template <int DT, bool BLOCK, bool COPY>
cudaError_t launch3(const QuantArgs& a, cudaStream_t stream) {
  const int64_t tiles = ((a.M + kTile - 1) / kTile) * ((a.K + kTile - 1) / kTile);
  int smem = 0;
  int64_t resident = 0;
  const void* kernel = reinterpret_cast<const void*>(quant_kernel<DT, BLOCK, COPY>);
  cudaError_t err = staging_bytes(kernel, stage_bytes<DT>(), &smem);
  if (err == cudaSuccess) err = resident_blocks(kernel, kThreads, smem, &resident);
  if (err != cudaSuccess) return err;
  if (resident < 1) resident = 1;
  const int64_t blocks = tiles < resident ? tiles : resident;
  quant_kernel<DT, BLOCK, COPY><<<(unsigned)blocks, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int DT>
cudaError_t launch_dt(const QuantArgs& a, cudaStream_t stream) {
  const bool copy = a.qc != nullptr;
  if (a.block) return copy ? launch3<DT, true, true>(a, stream) : launch3<DT, true, false>(a, stream);
  return copy ? launch3<DT, false, true>(a, stream) : launch3<DT, false, false>(a, stream);
}

}  // namespace

cudaError_t launch_quant(const QuantArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.K == 0) return cudaSuccess;
  if (a.M % 8 || a.K % 8) return cudaErrorInvalidValue;
  switch (a.dt) {
    case FT_F32: return launch_dt<FT_F32>(a, stream);
    case FT_BF16: return launch_dt<FT_BF16>(a, stream);
    case FT_F16: return launch_dt<FT_F16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fp8
}  // namespace fusedtune
