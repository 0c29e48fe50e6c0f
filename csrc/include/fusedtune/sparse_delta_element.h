// Sparse-delta family: one element of SparseDeltaAdamW (CPU and CUDA kernels share it).
#pragma once
#include "fusedtune/adamw_math.h"

namespace fusedtune {
namespace sparse_delta {

// AdamW on delta e (fp32 values, grads, moments), then weight[idx[e]] = round(base[e] + delta).
FT_HD void sparse_adamw_element(float* val, const float* g, float* m, float* v, void* weight, const void* base,
                                const int32_t* idx, int w_dt, int64_t e, const AdamConsts& c) {
  float mm = m[e], vv = v[e];
  const float nv = adamw(val[e], g[e], mm, vv, c);
  m[e] = mm;
  v[e] = vv;
  val[e] = nv;
  const float merged = ft_add(load_as_f32(load_bits(base, e, w_dt), w_dt), nv);
  store_bits(weight, idx[e], w_dt, round_rne(merged, w_dt));
}

}  // namespace sparse_delta
}  // namespace fusedtune
