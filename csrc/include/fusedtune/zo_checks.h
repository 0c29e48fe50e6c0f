// Argument checks and Params assembly for the zo kernels (host side, both dispatch keys).
// The Python front end (fusedtune.ops.zo) refuses bad input with friendlier messages first;
// these checks keep direct callers of torch.ops.fusedtune.zo_apply_kernel_ safe.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fusedtune/zo_math.h"

namespace fusedtune {

inline int zo_dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FT_F32;
    case at::kBFloat16: return FT_BF16;
    case at::kHalf: return FT_F16;
    default: TORCH_CHECK(false, "zo_apply_: tensors must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

inline void zo_check_args(at::TensorList tensors, at::IntArrayRef tensor_ids, const at::Tensor& seeds,
                          const at::Tensor& coeffs, const at::Tensor& prev_seeds, const at::Tensor& prev_coeffs,
                          int64_t noise, int64_t rounding) {
  TORCH_CHECK(tensors.size() == tensor_ids.size(), "zo_apply_: ", tensors.size(), " tensors but ",
              tensor_ids.size(), " tensor_ids");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && prev_seeds.scalar_type() == at::kLong,
              "zo_apply_: seeds must be int64");
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat && prev_coeffs.scalar_type() == at::kFloat,
              "zo_apply_: coeffs must be float32");
  TORCH_CHECK(seeds.numel() == coeffs.numel() && prev_seeds.numel() == prev_coeffs.numel(),
              "zo_apply_: seeds and coeffs differ in length");
  TORCH_CHECK(seeds.numel() > 0, "zo_apply_: needs at least one seed (pass coeff 0.0 for an undo alone)");
  TORCH_CHECK(noise == zo::NOISE_NORMAL || noise == zo::NOISE_RADEMACHER, "zo_apply_: bad noise code ", noise);
  TORCH_CHECK(rounding == zo::ROUND_NEAREST || rounding == zo::ROUND_STOCHASTIC, "zo_apply_: bad rounding code ",
              rounding);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    zo_dtype_code(t);
    TORCH_CHECK(t.is_contiguous(), "zo_apply_: tensors[", i, "] is not contiguous");
    TORCH_CHECK(t.device() == seeds.device() && t.device() == coeffs.device() &&
                    t.device() == prev_seeds.device() && t.device() == prev_coeffs.device(),
                "zo_apply_: tensors[", i, "] is on ", t.device(), " but seeds/coeffs on ", seeds.device());
    TORCH_CHECK(tensor_ids[i] >= 0 && tensor_ids[i] <= 0xFFFFFFFFLL, "zo_apply_: tensor_ids[", i,
                "] must fit in 32 bits unsigned");
  }
}

inline zo::Params zo_make_params(const at::Tensor& s, const at::Tensor& c, const at::Tensor& ps,
                                 const at::Tensor& pc, double alpha, int64_t noise, int64_t rounding,
                                 int64_t rounding_seed) {
  zo::Params p;
  p.seeds = s.data_ptr<int64_t>();
  p.coeffs = c.data_ptr<float>();
  p.prev_seeds = ps.numel() ? ps.data_ptr<int64_t>() : nullptr;
  p.prev_coeffs = pc.numel() ? pc.data_ptr<float>() : nullptr;
  p.n = (int32_t)s.numel();
  p.n_prev = (int32_t)ps.numel();
  p.noise = (int32_t)noise;
  p.rounding = (int32_t)rounding;
  p.rounding_seed = (uint64_t)rounding_seed;
  p.alpha = (float)alpha;
  p.scale = p.alpha != 1.0f;
  return p;
}

}  // namespace fusedtune
