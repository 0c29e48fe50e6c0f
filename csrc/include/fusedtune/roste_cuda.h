// Launch interface of the butterfly Hadamard CUDA kernel (plain C++; the .cu needs no torch headers).
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/hadamard_math.h"

namespace fusedtune {
namespace roste {

// rows x n (n = pl.m * pl.p) contiguous rows of dtype dt (16-byte aligned), out likewise; transpose: H_m^T
// (hadamard_factors.h's H_m) for the backward.
cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                            int dt, cudaStream_t stream);

// The tensor-core factor kernel (roste_mma.cu): 16-bit rows of n = m * p (m > 1, p = 2^k >= 8, n <= kMaxN,
// n % 256 == 0), the factor given as h: its MP x MP matrix (MP = 16 * ceil(m / 16) <= 176, zero-padded,
// row-major, x's dtype; H_m^T for the backward). Shared memory: Y [m][p + kMmaPad] fp32, X [MP][p + kMmaPad]
// 16-bit.
constexpr int kMmaPad = 8;
constexpr int kMmaMaxTiles = 11;   // MP <= 176: the largest factor shipped is 172

struct MmaPlan {
  int m, p, log_p;
  int shfl;   // lane stages: min(5, log_p - 3)
};

// the row-tile counts the kernel is compiled for: those of the factors fusedtune.reference.hadamard ships
// (12: 1; 20, 28: 2; 36..44: 3; 52, 60: 4; 76: 5; 108: 7; 140: 9; 148, 156: 10; 172: 11)
FT_HD constexpr bool mma_tiles_compiled(int mt) {
  return (mt >= 1 && mt <= 5) || mt == 7 || (mt >= 9 && mt <= kMmaMaxTiles);
}

inline bool make_mma_plan(int m, int p, MmaPlan* out) {
  if (m < 2 || !mma_tiles_compiled((m + 15) / 16) || p < kE || (p & (p - 1)) != 0) return false;
  const int64_t n = (int64_t)m * p;
  if (n > kMaxN || n % 256 != 0) return false;
  int log_p = 0;
  while ((1 << log_p) < p) ++log_p;
  *out = MmaPlan{m, p, log_p, log_p - 3 < 5 ? log_p - 3 : 5};
  return true;
}

inline int mma_smem_bytes(int m, int p) {
  return (m * 4 + (m + 15) / 16 * 16 * 2) * (p + kMmaPad);
}

// The most warps a block for mt = ceil(m / 16) row tiles of H_m, a multiple of the warp groups G (1 up to 3
// tiles: a warp holds all of them; else one a tile): the kernels are compiled for 2 blocks an SM at that size
// (registers: 64 a thread at 16 warps, 128 at 8 for 3 tiles' 36 fragment registers, 93 at 11 for 172's 44).
FT_HD constexpr int mma_max_warps(int mt) {
  return mt <= 2 ? 16 : (mt == 3 ? 8 : 16 / mt * mt);
}

// warps a block: the most, or fewer where the row has fewer 256-element chunks (one a warp) than that, but
// always a multiple of G
inline int mma_warps(int m, int p) {
  const int mt = (m + 15) / 16, groups = mt <= 3 ? 1 : mt;
  const int by_regs = mma_max_warps(mt) / groups, by_work = m * p / 256 / groups;
  const int k = by_regs < by_work ? by_regs : by_work;
  return groups * (k > 1 ? k : 1);
}

// bits of the next shared-memory pass of the butterflies from bit b (0 when done)
FT_HD int mma_pass_bits(const MmaPlan& pl, int b) {
  const int left = pl.log_p - b;
  return left <= 0 ? 0 : (left < 3 ? left : 3);
}

cudaError_t launch_hadamard_mma(const void* x, void* out, const void* h, int64_t rows, const MmaPlan& pl,
                                float scale, int dt, cudaStream_t stream);

}  // namespace roste
}  // namespace fusedtune
