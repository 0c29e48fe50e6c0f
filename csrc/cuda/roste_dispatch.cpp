// RoSTE family: CUDA dispatch-key registration of the butterfly Hadamard kernel.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedtune/roste_checks.h"
#include "fusedtune/roste_cuda.h"

namespace fusedtune {
namespace {

at::Tensor hadamard_cuda(const at::Tensor& x, double scale, at::IntArrayRef neg_masks) {
  const HadamardArgs a = hadamard_check(x, neg_masks, true);
  TORCH_CHECK(x.is_cuda(), "hadamard_kernel: x must be a CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "hadamard_kernel: x must be 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  int optin = 0;
  cudaError_t aerr = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index());
  TORCH_CHECK(aerr == cudaSuccess, "hadamard_kernel: cannot query shared memory: ", cudaGetErrorString(aerr));
  const int64_t smem = x.size(1) * (int64_t)sizeof(float);
  TORCH_CHECK(smem <= optin, "hadamard_kernel: a row of ", x.size(1), " needs ", smem,
              " bytes of shared memory; this GPU allows ", optin);
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;               // no rows (an empty batch): a grid of 0 blocks is a launch error
  cudaError_t err = roste::launch_hadamard(x.data_ptr(), out.data_ptr(), x.size(0), a.plan, a.transpose, (float)scale,
                                         a.dt, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "hadamard_kernel: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) { m.impl("hadamard_kernel", &fusedtune::hadamard_cuda); }
