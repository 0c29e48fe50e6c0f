// Half-fine-tuning family: CUDA dispatch-key registration of MaskedAdamW.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedtune/hft_checks.h"
#include "fusedtune/hft_cuda.h"
#include "fusedtune/multi_tensor.h"

namespace fusedtune {
namespace {

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList targets, at::TensorList rows,
                       at::ArrayRef<double> consts) {
  hft_check(params, grads, exp_avgs, exp_avg_sqs, targets, rows);
  if (params.empty()) return;
  const hft::AdamConsts c = hft_consts(consts);
  c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  hft::Launch launch;
  launch.count = 0;
  launch.block_start[0] = 0;
  auto fire = [&](const hft::Launch& l) {
    cudaError_t err = hft::launch_masked_adamw(l, c, stream);
    TORCH_CHECK(err == cudaSuccess, "masked_adamw: CUDA launch failed: ", cudaGetErrorString(err));
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const bool row = hft_row_master(targets, i);
    batch_add(launch,
              hft::TensorMeta{p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(),
                              exp_avg_sqs[i].data_ptr<float>(), row ? targets[i].data_ptr() : nullptr,
                              row ? rows[i].data_ptr<int64_t>() : nullptr, p.numel(), row ? p.size(1) : 1,
                              hft_dtype_code(p, "params"), row ? hft_dtype_code(targets[i], "targets") : 0},
              hft::blocks_for(p.numel()), hft::kMaxTensorsPerLaunch, fire);
  }
  batch_flush(launch, fire);
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) { m.impl("masked_adamw_kernel_", &fusedtune::masked_adamw_cuda); }
