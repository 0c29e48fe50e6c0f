// Sparse-delta family: one element of SparseDeltaAdamW (CPU and CUDA kernels share it).
#pragma once
#include "fusedtune/adamw_math.h"

namespace fusedtune {
namespace sparse_delta {

// Per-element step counts (SparseDeltaAdamW's bias_correction="element"): steps[e] counts the Adam
// steps of entry e since it was grown; an entry whose count equals the tensor's step (lr and step in
// OwnSteps) takes the host constants, any other count its own bias corrections (adam_own_bias).
struct OwnSteps {
  float lr;
  int32_t step;
};

// AdamW on delta e (fp32 values, grads, moments), then weight[idx[e]] = round(base[e] + delta).
// steps: the per-element counts (incremented here) or nullptr (every entry at the tensor's step).
FT_HD void sparse_adamw_element(float* val, const float* g, float* m, float* v, void* weight, const void* base,
                                const int32_t* idx, int32_t* steps, int w_dt, int64_t e, const AdamConsts& c,
                                const OwnSteps& own) {
  AdamConsts ce = c;
  if (steps) {
    const int32_t s = steps[e] + 1;
    steps[e] = s;
    if (s != own.step) adam_own_bias(ce, own.lr, (uint32_t)s);
  }
  float mm = m[e], vv = v[e];
  const float nv = adamw(val[e], g[e], mm, vv, ce);
  m[e] = mm;
  v[e] = vv;
  val[e] = nv;
  const float merged = ft_add(load_as_f32(load_bits(base, e, w_dt), w_dt), nv);
  store_bits(weight, idx[e], w_dt, round_rne(merged, w_dt));
}

}  // namespace sparse_delta
}  // namespace fusedtune
