// AdamW element rule shared by the optimizers of every family (hft MaskedAdamW, sparse_delta
// SparseDeltaAdamW); the PyTorch references perform the same operations in the same order.
#pragma once
#include "fusedtune/common.h"

namespace fusedtune {

struct AdamConsts {
  float decay, beta1, omb1, beta2, omb2, sbc2, eps, step_size;  // rounded on the host, see adamw_constants
};

FT_HD float ft_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// b^n in float32 by binary exponentiation (low bit first, each product rounded): the references do the
// same products in the same order, so every backend gets the same bits.
FT_HD float pow_f32(float b, uint32_t n) {
  float r = 1.0f;
  while (n) {
    if (n & 1u) r = ft_mul(r, b);
    n >>= 1;
    if (n) b = ft_mul(b, b);
  }
  return r;
}

// The bias corrections of an element that has taken s Adam steps of its own (an entry grown by
// regrowth): sbc2 = sqrt(1 - beta2^s), step_size = lr / (1 - beta1^s), in float32 from c.beta1/c.beta2.
FT_HD void adam_own_bias(AdamConsts& c, float lr, uint32_t s) {
  c.sbc2 = ft_sqrt(ft_sub(1.0f, pow_f32(c.beta2, s)));
  c.step_size = ft_div(lr, ft_sub(1.0f, pow_f32(c.beta1, s)));
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
