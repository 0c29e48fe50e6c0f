// Argument checks for the SparseDeltaAdamW kernels (host side, both dispatch keys).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fusedtune/adamw_math.h"

namespace fusedtune {

inline int sparse_delta_weight_dtype(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return FT_F32;
    case at::kBFloat16: return FT_BF16;
    case at::kHalf: return FT_F16;
    default: TORCH_CHECK(false, "sparse_adamw: weights must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return -1;
}

inline AdamConsts sparse_delta_consts(at::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 8, "sparse_adamw: expected 8 constants, got ", c.size());
  return AdamConsts{(float)c[0], (float)c[1], (float)c[2], (float)c[3], (float)c[4], (float)c[5], (float)c[6], (float)c[7]};
}

inline void sparse_delta_check(at::TensorList values, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList weights, at::TensorList bases,
                               at::TensorList indices) {
  const size_t n = values.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && weights.size() == n &&
                  bases.size() == n && indices.size() == n,
              "sparse_adamw: lists differ in length");
  for (size_t i = 0; i < n; ++i) {
    const int64_t k = values[i].numel();
    for (const at::Tensor* t : {&values[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == k && t->is_contiguous() &&
                      t->device() == values[0].device(),
                  "sparse_adamw: values/grads/moments ", i, " must be contiguous float32 of ", k, " elements");
    sparse_delta_weight_dtype(weights[i]);
    TORCH_CHECK(bases[i].scalar_type() == weights[i].scalar_type() && bases[i].numel() == k &&
                    indices[i].scalar_type() == at::kInt && indices[i].numel() == k && weights[i].is_contiguous() &&
                    bases[i].is_contiguous() && indices[i].is_contiguous(),
                "sparse_adamw: weight/base/indices ", i, " do not match the ", k, " deltas");
    TORCH_CHECK(weights[i].device() == values[0].device() && bases[i].device() == values[0].device() &&
                    indices[i].device() == values[0].device(),
                "sparse_adamw: tensors ", i, " are not on ", values[0].device());
  }
}

}  // namespace fusedtune
