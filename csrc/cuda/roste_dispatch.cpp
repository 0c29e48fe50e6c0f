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

at::Tensor hadamard_mma_cuda(const at::Tensor& x, double scale, at::IntArrayRef neg_masks) {
  const HadamardArgs a = hadamard_check(x, neg_masks, true);
  TORCH_CHECK(x.is_cuda(), "hadamard_mma_kernel: x must be a CUDA tensor");
  TORCH_CHECK(a.dt != FT_F32, "hadamard_mma_kernel: x must be bfloat16 or float16 (float32 rows: hadamard_kernel)");
  TORCH_CHECK(a.plan.m > 1, "hadamard_mma_kernel: n = ", x.size(1), " is a power of two (no factor): hadamard_kernel");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "hadamard_mma_kernel: x must be 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  int major = 0, optin = 0;
  cudaError_t aerr = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  if (aerr == cudaSuccess)
    aerr = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index());
  TORCH_CHECK(aerr == cudaSuccess, "hadamard_mma_kernel: cannot query the device: ", cudaGetErrorString(aerr));
  TORCH_CHECK(major >= 8, "hadamard_mma_kernel: needs sm_80 or newer (bf16/fp16 mma.sync)");
  const int smem = roste::mma_smem_bytes(a.plan.m, a.plan.p);
  TORCH_CHECK(smem <= optin, "hadamard_mma_kernel: a row of ", x.size(1), " needs ", smem,
              " bytes of shared memory; this GPU allows ", optin);
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  cudaError_t err = roste::launch_hadamard_mma(x.data_ptr(), out.data_ptr(), x.size(0), a.plan, a.transpose,
                                               (float)scale, a.dt, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "hadamard_mma_kernel: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) {
  m.impl("hadamard_kernel", &fusedtune::hadamard_cuda);
  m.impl("hadamard_mma_kernel", &fusedtune::hadamard_mma_cuda);
}
