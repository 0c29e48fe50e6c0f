// Half-fine-tuning family, C++ CPU kernel of MaskedAdamW (math in hft_element.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fusedtune/hft_checks.h"
#include "fusedtune/hft_element.h"

namespace fusedtune {
namespace {

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList targets, at::TensorList rows,
                      at::ArrayRef<double> consts) {
  hft_check(params, grads, exp_avgs, exp_avg_sqs, targets, rows);
  const hft::AdamConsts c = hft_consts(consts);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const bool row = hft_row_master(targets, i);
    void* tgt = row ? targets[i].data_ptr() : nullptr;
    const int64_t* r = row ? rows[i].data_ptr<int64_t>() : nullptr;
    const int64_t cols = row ? p.size(1) : 1;
    const int pdt = hft_dtype_code(p, "params"), tdt = row ? hft_dtype_code(targets[i], "targets") : 0;
    void* pp = p.data_ptr();
    const void* gp = grads[i].data_ptr();
    float *m = exp_avgs[i].data_ptr<float>(), *v = exp_avg_sqs[i].data_ptr<float>();
    at::parallel_for(0, p.numel(), 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) hft::masked_adamw_element(pp, gp, m, v, tgt, r, cols, pdt, tdt, e, c);
    });
  }
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("masked_adamw_kernel_", &fusedtune::masked_adamw_cpu); }
