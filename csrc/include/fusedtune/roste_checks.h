// Argument checks and the plan of the butterfly Hadamard kernels (host side, both dispatch keys).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "fusedtune/hadamard_math.h"

namespace fusedtune {

struct HadamardArgs {
  roste::Plan plan;
  bool transpose;   // the masks are H_m^T's
  int dt;
};

inline HadamardArgs hadamard_check(const at::Tensor& x, at::ArrayRef<int64_t> neg_masks, bool gpu) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "hadamard_kernel: x must be a contiguous [rows, n] tensor");
  HadamardArgs a;
  switch (x.scalar_type()) {
    case at::kFloat: a.dt = FT_F32; break;
    case at::kBFloat16: a.dt = FT_BF16; break;
    case at::kHalf: a.dt = FT_F16; break;
    default: TORCH_CHECK(false, "hadamard_kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  const int64_t n = x.size(1);
  const int64_t m = neg_masks.empty() ? 1 : (int64_t)neg_masks.size();
  TORCH_CHECK(m <= roste::kMaxM && n % m == 0, "hadamard_kernel: factor order ", m, " does not fit n = ", n,
              " (at most ", roste::kMaxM, ")");
  TORCH_CHECK(m == 1 || roste::factor_compiled((int)m), "hadamard_kernel: factor order ", m,
              " is not compiled (1, 12, 28, 36, 40, 44)");
  const int64_t p = n / m;
  TORCH_CHECK(p > 0 && (p & (p - 1)) == 0, "hadamard_kernel: n / m = ", p, " is not a power of two");
  TORCH_CHECK(n <= roste::kMaxN && roste::make_plan((int)m, (int)p, gpu, &a.plan), "hadamard_kernel: n = ", n,
              " = ", m, " x ", p, " is not served (at most ", roste::kMaxN, ", 2^k >= 8",
              gpu ? ", a multiple of 256 on the GPU)" : ")");
  for (int64_t i = 0; i < (int64_t)neg_masks.size(); ++i)
    TORCH_CHECK(neg_masks[i] >= 0 && (m == 64 || neg_masks[i] < (int64_t(1) << m)),
                "hadamard_kernel: sign mask ", i, " has bits beyond the factor order ", m);
  // the kernels compile H_m's signs in: the masks must be that matrix (forward) or its transpose (backward)
  bool fwd = true, bwd = true;
  for (int64_t i = 0; i < (int64_t)neg_masks.size(); ++i) {
    uint64_t t = 0;
    for (int64_t r = 0; r < m; ++r) t |= ((roste::factor_row((int)m, (int)r) >> i) & 1u) << r;
    fwd = fwd && (uint64_t)neg_masks[i] == roste::factor_row((int)m, (int)i);
    bwd = bwd && (uint64_t)neg_masks[i] == t;
  }
  TORCH_CHECK(fwd || bwd, "hadamard_kernel: the sign masks are neither the compiled H_", m,
              " nor its transpose (the kernels hold fusedtune.reference.hadamard.factor_matrix's matrices)");
  a.transpose = !fwd;
  return a;
}

}  // namespace fusedtune
