// AdamW element rule shared by the optimizers of every family (hft MaskedAdamW, sparse_delta
// SparseDeltaAdamW); the PyTorch references perform the same operations in the same order.
#pragma once
#include "fusedtune/common.h"

namespace fusedtune {

struct AdamConsts {
  float decay, beta1, omb1, beta2, omb2, sbc2, eps, step_size;  // rounded on the host, see adamw_constants
};

FT_HD float ft_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FT_HD float ft_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// One AdamW element update; returns the new parameter value (float32, not yet rounded).
FT_HD float adamw(float p, float g, float& m, float& v, const AdamConsts& c) {
  p = ft_mul(p, c.decay);
  m = ft_add(ft_mul(c.beta1, m), ft_mul(c.omb1, g));
  v = ft_add(ft_mul(c.beta2, v), ft_mul(c.omb2, ft_mul(g, g)));
  const float denom = ft_add(ft_div(ft_sqrt(v), c.sbc2), c.eps);
  return ft_sub(p, ft_mul(c.step_size, ft_div(m, denom)));
}

}  // namespace fusedtune
