// Argument checks for the MaskedAdamW kernels (host side, both dispatch keys).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fusedtune/hft_math.h"

namespace fusedtune {

inline int hft_dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return FT_F32;
    case at::kBFloat16: return FT_BF16;
    case at::kHalf: return FT_F16;
    default: TORCH_CHECK(false, "masked_adamw: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

inline hft::AdamConsts hft_consts(at::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 8, "masked_adamw: expected 8 constants, got ", c.size());
  return hft::AdamConsts{(float)c[0], (float)c[1], (float)c[2], (float)c[3],
                         (float)c[4], (float)c[5], (float)c[6], (float)c[7]};
}

// targets / rows: one entry per tensor (targets[i] empty: a plain parameter), or both empty lists (no row
// masters at all).
inline bool hft_row_master(at::TensorList targets, size_t i) { return !targets.empty() && targets[i].numel() > 0; }

inline void hft_check(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList targets, at::TensorList rows) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  ((targets.size() == n && rows.size() == n) || (targets.empty() && rows.empty())),
              "masked_adamw: lists differ in length");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    hft_dtype_code(p, "params");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "masked_adamw: grads[", i, "] dtype differs from params[", i, "]");
    TORCH_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "masked_adamw: moments must be float32");
    TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
                "masked_adamw: tensors[", i, "] differ in size");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
                "masked_adamw: tensors[", i, "] must be contiguous");
    TORCH_CHECK(p.device() == params[0].device() && g.device() == p.device() && m.device() == p.device() &&
                    v.device() == p.device(),
                "masked_adamw: tensors[", i, "] are not all on ", params[0].device());
    if (hft_row_master(targets, i)) {
      const at::Tensor &t = targets[i], &r = rows[i];
      hft_dtype_code(t, "targets");
      TORCH_CHECK(p.dim() == 2 && t.dim() == 2 && t.size(1) == p.size(1) && r.numel() == p.size(0),
                  "masked_adamw: row master ", i, " has shape ", p.sizes(), ", target ", t.sizes(), ", ", r.numel(),
                  " rows");
      TORCH_CHECK(r.scalar_type() == at::kLong && r.is_contiguous() && t.is_contiguous() && t.device() == p.device() &&
                      r.device() == p.device(),
                  "masked_adamw: rows must be contiguous int64 and target contiguous, on the params' device");
    }
  }
}

}  // namespace fusedtune
