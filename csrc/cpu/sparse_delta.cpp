// Sparse-delta family, C++ CPU kernel of SparseDeltaAdamW (math in sparse_delta_element.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fusedtune/sparse_delta_checks.h"
#include "fusedtune/sparse_delta_element.h"

namespace fusedtune {
namespace {

void sparse_adamw_cpu(at::TensorList values, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList weights, at::TensorList bases,
                      at::TensorList indices, at::ArrayRef<double> consts) {
  sparse_delta_check(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices);
  const AdamConsts c = sparse_delta_consts(consts);
  for (size_t i = 0; i < values.size(); ++i) {
    float* val = values[i].data_ptr<float>();
    const float* g = grads[i].data_ptr<float>();
    float *m = exp_avgs[i].data_ptr<float>(), *v = exp_avg_sqs[i].data_ptr<float>();
    void* w = weights[i].data_ptr();
    const void* base = bases[i].data_ptr();
    const int32_t* idx = indices[i].data_ptr<int32_t>();
    const int wdt = sparse_delta_weight_dtype(weights[i]);
    at::parallel_for(0, values[i].numel(), 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) sparse_delta::sparse_adamw_element(val, g, m, v, w, base, idx, wdt, e, c);
    });
  }
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("sparse_adamw_kernel_", &fusedtune::sparse_adamw_cpu); }
