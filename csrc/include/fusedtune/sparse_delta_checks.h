// Argument checks of the sparse-delta kernels, SparseDeltaAdamW and the tiled SDDMM (host side, both
// dispatch keys).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "fusedtune/adamw_math.h"
#include "fusedtune/sddmm_tile.h"
#include "fusedtune/sparse_delta_element.h"

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

// consts: the 8 AdamConsts (adamw_constants on the host), then lr and the tensors' step (OwnSteps).
inline AdamConsts sparse_delta_consts(at::ArrayRef<double> c, sparse_delta::OwnSteps& own) {
  TORCH_CHECK(c.size() == 10, "sparse_adamw: expected 10 constants, got ", c.size());
  TORCH_CHECK(c[9] >= 1 && c[9] < 2147483648.0 && c[9] == (double)(int64_t)c[9],
              "sparse_adamw: the step (constant 9) must be an integer in [1, 2^31), got ", c[9]);
  own = sparse_delta::OwnSteps{(float)c[8], (int32_t)c[9]};
  return AdamConsts{(float)c[0], (float)c[1], (float)c[2], (float)c[3], (float)c[4], (float)c[5], (float)c[6], (float)c[7]};
}

// steps: an empty list (no tensor counts its entries' steps) or one entry per tensor: steps[i] empty (the
// tensor's entries all at its step) or contiguous int32 counts, one per delta.
inline void sparse_delta_check(at::TensorList values, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList weights, at::TensorList bases,
                               at::TensorList indices, at::TensorList steps) {
  const size_t n = values.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && weights.size() == n &&
                  bases.size() == n && indices.size() == n && (steps.size() == n || steps.empty()),
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
    TORCH_CHECK(steps.empty() || !steps[i].defined() || steps[i].numel() == 0 ||
                    (steps[i].scalar_type() == at::kInt && steps[i].numel() == k && steps[i].is_contiguous() &&
                     steps[i].device() == values[0].device()),
                "sparse_adamw: steps ", i, " must be empty or contiguous int32 of ", k, " elements on ",
                values[0].device());
  }
}

inline int32_t* sparse_delta_steps_ptr(at::TensorList steps, size_t i) {
  return !steps.empty() && steps[i].defined() && steps[i].numel() ? steps[i].data_ptr<int32_t>() : nullptr;
}

// sddmm_kernel(dy [T, N], x [T, K], indices [k], plan [R, C, splits, cap, span]): the problem (without
// its buffers), the plan and the dtype code, or a clear error.
inline int sddmm_check(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices, at::IntArrayRef plan,
                       sddmm::Problem& P, sddmm::Plan& p) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), "sddmm_kernel: dy [T, out] and x [T, in] ",
              "must be 2-D with the same tokens, got ", dy.sizes(), " and ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "sddmm_kernel: dy (", dy.scalar_type(), ") and x (",
              x.scalar_type(), ") must share a dtype");
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "sddmm_kernel: dy and x must be float32, bfloat16 or float16, got ", st);
  const int dt = sparse_delta_weight_dtype(x);
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "sddmm_kernel: dy and x must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 1 && indices.is_contiguous(),
              "sddmm_kernel: indices must be a contiguous 1-D int32 tensor, got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(dy.device() == x.device() && indices.device() == x.device(), "sddmm_kernel: dy, x and indices must ",
              "be on one device");
  TORCH_CHECK(dy.size(1) * x.size(1) < ((int64_t)1 << 31) && indices.numel() < ((int64_t)1 << 31),
              "sddmm_kernel: out * in = ", dy.size(1) * x.size(1), " and k = ", indices.numel(),
              " must be below 2^31 (int32 flat indices and entry counts; the layers refuse larger weights)");
  TORCH_CHECK(indices.numel() == 0 || (dy.size(1) > 0 && x.size(1) > 0), "sddmm_kernel: ", indices.numel(),
              " indices into a weight of ", dy.size(1), " x ", x.size(1));
  TORCH_CHECK(plan.size() == 5, "sddmm_kernel: plan must be [R, C, splits, cap, span], got ", plan.size(), " values");
  P.T = x.size(0);
  P.N = dy.size(1);
  P.K = x.size(1);
  P.k = indices.numel();
  p.R = (int32_t)plan[0];
  p.C = (int32_t)plan[1];
  p.splits = (int32_t)plan[2];
  p.cap = (int32_t)plan[3];
  p.span = plan[4];
  TORCH_CHECK(plan[0] >= 1 && plan[0] <= sddmm::kMaxTile && plan[1] >= 1 && plan[1] <= sddmm::kMaxTile,
              "sddmm_kernel: tile rows and columns must lie in [1, ", sddmm::kMaxTile, "], got ", plan[0], " x ", plan[1]);
  TORCH_CHECK(plan[2] >= 1 && plan[2] <= 65535 && plan[3] >= 1 && plan[3] <= ((int64_t)1 << 24) && plan[4] >= 1 &&
                  plan[4] % sddmm::kTc == 0 && plan[2] * plan[4] >= P.T,
              "sddmm_kernel: plan ", plan, " needs 1 <= splits <= 65535, 1 <= cap <= 2^24, span a positive multiple of ",
              sddmm::kTc, " and splits * span >= T = ", P.T);
  TORCH_CHECK((P.N + p.R - 1) / p.R <= 65535, "sddmm_kernel: ", P.N, " rows need more than 65535 tiles of ", p.R);
  return dt;
}

// The result (zeros), the CSR row pointers and the splits' partial sums (the result itself when there
// is one split) of one sddmm_kernel call, with P's pointers set to them and to the inputs.
struct SddmmBuffers {
  at::Tensor out, row_ptr, partial;
};

inline SddmmBuffers sddmm_buffers(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                                  const sddmm::Plan& plan, sddmm::Problem& P) {
  SddmmBuffers b;
  b.out = at::zeros({P.k}, x.options().dtype(at::kFloat));
  b.row_ptr = at::empty({P.N + 1}, indices.options());
  b.partial = plan.splits == 1 || P.k == 0 ? b.out : at::zeros({plan.splits, P.k}, b.out.options());
  P.dy = dy.data_ptr();
  P.x = x.data_ptr();
  P.idx = indices.data_ptr<int32_t>();
  P.row_ptr = b.row_ptr.data_ptr<int32_t>();
  P.partial = b.partial.data_ptr<float>();
  return b;
}

}  // namespace fusedtune
