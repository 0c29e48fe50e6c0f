// Sparse-delta family: CUDA dispatch-key registration of SparseDeltaAdamW and the tiled SDDMM.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedtune/multi_tensor.h"
#include "fusedtune/sparse_delta_checks.h"
#include "fusedtune/sparse_delta_cuda.h"

namespace fusedtune {
namespace {

void sparse_adamw_cuda(at::TensorList values, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList weights, at::TensorList bases,
                       at::TensorList indices, at::TensorList steps, at::ArrayRef<double> consts) {
  sparse_delta_check(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps);
  if (values.empty()) return;
  sparse_delta::OwnSteps own;
  const AdamConsts c = sparse_delta_consts(consts, own);
  c10::cuda::CUDAGuard guard(values[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  sparse_delta::Launch launch;
  launch.count = 0;
  launch.block_start[0] = 0;
  auto fire = [&](const sparse_delta::Launch& l) {
    cudaError_t err = sparse_delta::launch_sparse_adamw(l, c, own, stream);
    TORCH_CHECK(err == cudaSuccess, "sparse_adamw: CUDA launch failed: ", cudaGetErrorString(err));
  };
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i].numel() == 0) continue;
    batch_add(launch,
              sparse_delta::TensorMeta{values[i].data_ptr<float>(), grads[i].data_ptr<float>(),
                                       exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
                                       weights[i].data_ptr(), bases[i].data_ptr(), indices[i].data_ptr<int32_t>(),
                                       sparse_delta_steps_ptr(steps, i), values[i].numel(),
                                       sparse_delta_weight_dtype(weights[i])},
              sparse_delta::blocks_for(values[i].numel()), sparse_delta::kMaxTensorsPerLaunch, fire);
  }
  batch_flush(launch, fire);
}

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices, at::IntArrayRef plan_) {
  sddmm::Problem P;
  sddmm::Plan plan;
  const int dt = sddmm_check(dy, x, indices, plan_, P, plan);
  TORCH_CHECK(x.is_cuda(), "sddmm_kernel: the CUDA kernel got tensors on ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  int optin = 0;
  cudaError_t aerr = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index());
  TORCH_CHECK(aerr == cudaSuccess, "sddmm_kernel: cannot query shared memory: ", cudaGetErrorString(aerr));
  const size_t smem = sddmm::layout(plan, x.element_size()).total;
  TORCH_CHECK(smem <= (size_t)optin, "sddmm_kernel: plan ", plan_, " needs ", smem,
              " bytes of shared memory per tile; this GPU allows ", optin);
  const SddmmBuffers bufs = sddmm_buffers(dy, x, indices, plan, P);
  if (P.k == 0) return bufs.out;
  cudaError_t err = sparse_delta::launch_sddmm(P, plan, dt, bufs.out.data_ptr<float>(),
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sddmm_kernel: CUDA launch failed: ", cudaGetErrorString(err));
  return bufs.out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) {
  m.impl("sparse_adamw_kernel_", &fusedtune::sparse_adamw_cuda);
  m.impl("sddmm_kernel", &fusedtune::sddmm_cuda);
}
