// RoSTE family: the pieces of the butterfly Hadamard transform shared by the CPU kernel
// (csrc/cpu/roste.cpp) and the CUDA kernel (csrc/cuda/roste.cu), so the CPU tests check the same
// stage plan, butterflies and factor sums the GPU runs.
//
// A row of n = m * p elements (p = 2^k, m = 1 or a Hadamard factor <= kMaxM) is X [m, p]; the
// transform is Y = H_m X H_p^T * scale (H_p Sylvester; H_m given as one bit mask per output row,
// bit r set where the entry is -1). The power-of-two part runs as radix-2 butterflies over the bits of
// the flat index below log2(p) (X's rows are p-aligned, so the low bits are the column bits):
//   bits 0..2            in registers: a thread's chunk of kE = 8 consecutive elements
//   bits 3..3+S-1        across lanes (warp shuffles on the GPU), S = min(5, log2(p) - 3)
//   bits 3+S..log2(p)-1  in shared memory, up to 3 bits per pass (a group of 8 in registers)
// then H_m over the rows column by column (m sums of +-x per output), and the scale. fp32 throughout,
// adds and subtracts only (no contraction question).
#pragma once
#include "fusedtune/common.h"

namespace fusedtune {
namespace roste {

constexpr int kE = 8;          // elements per thread chunk
constexpr int kMaxM = 44;      // largest factor the kernels hold in registers
constexpr int kMaxN = 32768;
constexpr int kMaxThreads = 512;

struct Plan {
  int m, p, log_p;
  int shfl;      // lane stages S
  int threads;   // T: a multiple of 32 that divides the chunk count (every lane runs every iteration)
  int iters;     // chunks per thread = n / 8 / T
};

// The plan for n = m * p, or false when the kernels do not serve it (m > kMaxM, p < 8, n > kMaxN, and
// on the GPU n % 256 != 0: whole warps of chunks); the callers check those first and say so.
FT_HD bool make_plan(int m, int p, bool gpu, Plan* out) {
  const int n = m * p;
  if (n > kMaxN || m > kMaxM || p < kE || (gpu && n % 256 != 0)) return false;
  int log_p = 0;
  while ((1 << log_p) < p) ++log_p;
  const int chunks = n / kE;
  int d = kMaxThreads / 32;
  while (d > 1 && (chunks / 32) % d != 0) --d;   // (on the CPU the thread count is not used)
  out->m = m;
  out->p = p;
  out->log_p = log_p;
  out->shfl = log_p - 3 < 5 ? log_p - 3 : 5;
  out->threads = 32 * d;
  out->iters = chunks / out->threads;
  return true;
}

// bits 0..2 of a chunk, in registers
FT_HD void butterfly8(float v[kE]) {
  FT_UNROLL
  for (int h = 1; h < kE; h <<= 1) {
    FT_UNROLL
    for (int e = 0; e < kE; ++e) {
      if (!(e & h)) {
        const float a = v[e], b = v[e + h];
        v[e] = ft_add(a, b);
        v[e + h] = ft_sub(a, b);
      }
    }
  }
}

// one lane stage: (a, b) -> (a + b, a - b), the upper lane of the pair holds b and gets a - b
FT_HD float lane_combine(float mine, float partner, bool upper) {
  return upper ? ft_sub(partner, mine) : ft_add(mine, partner);
}

// One shared-memory pass over bits [b, b + R) of group g (g counts the n / 2^R groups).
template <int R>
FT_HD void radix_pass(float* s, int64_t g, int b) {
  const int64_t low = g & ((int64_t(1) << b) - 1);
  const int64_t base = ((g >> b) << (b + R)) | low;
  float v[1 << R];
  FT_UNROLL
  for (int k = 0; k < (1 << R); ++k) v[k] = s[base + (int64_t(k) << b)];
  FT_UNROLL
  for (int h = 1; h < (1 << R); h <<= 1) {
    FT_UNROLL
    for (int k = 0; k < (1 << R); ++k) {
      if (!(k & h)) {
        const float a = v[k], c = v[k + h];
        v[k] = ft_add(a, c);
        v[k + h] = ft_sub(a, c);
      }
    }
  }
  FT_UNROLL
  for (int k = 0; k < (1 << R); ++k) s[base + (int64_t(k) << b)] = v[k];
}

// bits of the next shared-memory pass starting at bit b (0 when done)
FT_HD int pass_bits(const Plan& pl, int b) {
  const int left = pl.log_p - b;
  return left <= 0 ? 0 : (left < 3 ? left : 3);
}

// Column j of H_m X: out[i * p + j] = scale * sum_r (+-) s[r * p + j], rounded to dt.
template <int M>
FT_HD void factor_column(const float* s, int p, int j, const uint64_t* neg, float scale, void* out_row, int dt) {
  float x[M];
  FT_UNROLL
  for (int r = 0; r < M; ++r) x[r] = s[r * p + j];
  FT_UNROLL
  for (int i = 0; i < M; ++i) {
    const uint64_t mask = neg[i];
    float acc = 0.0f;
    FT_UNROLL
    for (int r = 0; r < M; ++r) acc = ((mask >> r) & 1u) ? ft_sub(acc, x[r]) : ft_add(acc, x[r]);
    store_bits(out_row, int64_t(i) * p + j, dt, round_rne(ft_mul(acc, scale), dt));
  }
}

}  // namespace roste
}  // namespace fusedtune
