// RoSTE family: the pieces of the butterfly Hadamard transform shared by the CPU kernel
// (csrc/cpu/roste.cpp) and the CUDA kernel (csrc/cuda/roste.cu), so the CPU tests check the same
// stage plan, butterflies and factor sums the GPU runs.
//
// A row of n = m * p elements (p = 2^k, m = 1 or a Hadamard factor <= kMaxM) is X [m, p]; the
// transform is Y = H_m X H_p^T * scale (H_p Sylvester; H_m one of hadamard_factors.h's matrices, or its
// transpose for the backward). The power-of-two part runs as radix-2 butterflies over the bits of
// the flat index below log2(p) (X's rows are p-aligned, so the low bits are the column bits):
//   bits 0..2            in registers: a thread's chunk of kE = 8 consecutive elements
//   bits 3..3+S-1        across lanes (warp shuffles on the GPU), S = min(5, log2(p) - 3)
//   bits 3+S..log2(p)-1  in shared memory, up to 3 bits per pass (a group of 8 in registers)
// then H_m (or H_m^T) over the rows (m sums of +-x per output, the signs compiled in from
// hadamard_factors.h), and the scale. fp32 throughout, adds and subtracts only (no contraction question).
#pragma once
#include "fusedtune/common.h"
#include "fusedtune/hadamard_factors.h"

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

// The plan for n = m * p, or false when the kernels do not serve it (m not compiled, p < 8, n > kMaxN, and
// on the GPU n % 256 != 0: whole warps of chunks); hadamard_check (roste_checks.h) says which.
FT_HD bool make_plan(int m, int p, bool gpu, Plan* out) {
  const int n = m * p;
  if (n > kMaxN || (m != 1 && !factor_compiled(m)) || p < kE || (gpu && n % 256 != 0)) return false;
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

// The radix-2^R butterflies of the 2^R values q[k << b] (k < 2^R), in place.
template <int R>
FT_HD void radix_group(float* q, int b) {
  float v[1 << R];
  FT_UNROLL
  for (int k = 0; k < (1 << R); ++k) v[k] = q[int64_t(k) << b];
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
  for (int k = 0; k < (1 << R); ++k) q[int64_t(k) << b] = v[k];
}

// One shared-memory pass over bits [b, b + R) of group g (g counts the n / 2^R groups).
template <int R>
FT_HD void radix_pass(float* s, int64_t g, int b) {
  const int64_t low = g & ((int64_t(1) << b) - 1);
  radix_group<R>(s + (((g >> b) << (b + R)) | low), b);
}

// bits of the next shared-memory pass starting at bit b (0 when done)
FT_HD int pass_bits(const Plan& pl, int b) {
  const int left = pl.log_p - b;
  return left <= 0 ? 0 : (left < 3 ? left : 3);
}

// Whether H_m[i, r] (H_m^T's when T) is -1: a compile-time constant once i and r are (unrolled loops).
template <int M, bool T>
FT_HD constexpr bool factor_neg(int i, int r) {
  return ((T ? factor_row(M, r) >> i : factor_row(M, i) >> r) & 1u) != 0;
}

// Whether H_m equals its transpose (then the backward's H_m^T is the forward's kernel).
FT_HD constexpr bool factor_symmetric(int m) {
  for (int i = 0; i < m; ++i)
    for (int r = 0; r < i; ++r)
      if (((factor_row(m, i) >> r) & 1u) != ((factor_row(m, r) >> i) & 1u)) return false;
  return true;
}

constexpr int kFactorOut = 4;   // outputs of a factor item (every compiled m is a multiple of 4)

// Factor item (j, Q): outputs i = 4Q .. 4Q + 3 of column j of H_m X (H_m^T X when T), times scale:
// y[k] = scale * sum_r (+-) s[r * p + j], the terms from 0.0f in order r = 0..m-1, each one add or
// subtract. The n / 4 items of a row spread evenly over the GPU block's threads (n / 8 = threads * iters).
template <int M, bool T, int Q>
FT_HD void factor_item(const float* s, int p, int j, float scale, float y[kFactorOut]) {
  float x[M];
  FT_UNROLL
  for (int r = 0; r < M; ++r) x[r] = s[r * p + j];
  FT_UNROLL
  for (int k = 0; k < kFactorOut; ++k) {
    float acc = 0.0f;
    FT_UNROLL
    for (int r = 0; r < M; ++r) acc = factor_neg<M, T>(kFactorOut * Q + k, r) ? ft_sub(acc, x[r]) : ft_add(acc, x[r]);
    y[k] = ft_mul(acc, scale);
  }
}

// factor_item for a runtime q (a chain of compile-time cases: the signs stay constants)
template <int M, bool T, int Q = 0>
FT_HD void factor_outputs(const float* s, int p, int j, int q, float scale, float y[kFactorOut]) {
  if constexpr (Q + 1 < M / kFactorOut) {
    if (q != Q) return factor_outputs<M, T, Q + 1>(s, p, j, q, scale, y);
  }
  factor_item<M, T, Q>(s, p, j, scale, y);
}

}  // namespace roste
}  // namespace fusedtune
