// Zeroth-order family: CUDA dispatch-key registration; batches tensors into kernel launches.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedtune/multi_tensor.h"
#include "fusedtune/zo_checks.h"
#include "fusedtune/zo_cuda.h"

namespace fusedtune {
namespace {

void zo_apply_cuda(at::TensorList tensors, at::IntArrayRef tensor_ids, const at::Tensor& seeds,
                   const at::Tensor& coeffs, const at::Tensor& prev_seeds, const at::Tensor& prev_coeffs,
                   double alpha, int64_t noise, int64_t rounding, int64_t rounding_seed) {
  zo_check_args(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs, noise, rounding);
  if (tensors.empty()) return;
  c10::cuda::CUDAGuard guard(seeds.device());
  auto s = seeds.contiguous(), c = coeffs.contiguous(), ps = prev_seeds.contiguous(), pc = prev_coeffs.contiguous();
  zo::Params p = zo_make_params(s, c, ps, pc, alpha, noise, rounding, rounding_seed);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  zo::Launch launch;
  launch.count = 0;
  launch.block_start[0] = 0;
  auto fire = [&](const zo::Launch& l) {
    cudaError_t err = zo::launch_apply(l, p, stream);
    TORCH_CHECK(err == cudaSuccess, "zo_apply_: CUDA launch failed: ", cudaGetErrorString(err));
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    batch_add(launch, zo::TensorMeta{t.data_ptr(), t.numel(), (uint32_t)tensor_ids[i], zo_dtype_code(t)},
              zo::blocks_for(t.numel()), zo::kMaxTensorsPerLaunch, fire);
  }
  batch_flush(launch, fire);
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) { m.impl("zo_apply_kernel_", &fusedtune::zo_apply_cuda); }
