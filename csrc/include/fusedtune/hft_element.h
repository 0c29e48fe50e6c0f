// MaskedAdamW: one element of one tensor, from storage to storage (CPU and CUDA kernels).
#pragma once
#include "fusedtune/hft_math.h"

namespace fusedtune {
namespace hft {

// p/g share p_dt; m, v are fp32; a row master (target != null) also writes target[rows[e / cols]].
FT_HD void masked_adamw_element(void* p, const void* g, float* m, float* v, void* target, const int64_t* rows,
                                int64_t cols, int p_dt, int target_dt, int64_t e, const AdamConsts& c) {
  float mm = m[e], vv = v[e];
  const float np = adamw(load_as_f32(load_bits(p, e, p_dt), p_dt), load_as_f32(load_bits(g, e, p_dt), p_dt), mm, vv, c);
  m[e] = mm;
  v[e] = vv;
  store_bits(p, e, p_dt, round_rne(np, p_dt));
  if (target) store_bits(target, rows[e / cols] * cols + e % cols, target_dt, round_rne(np, target_dt));
}

}  // namespace hft
}  // namespace fusedtune
