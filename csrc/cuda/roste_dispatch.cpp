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

at::Tensor hadamard_mma_cuda(const at::Tensor& x, double scale, const at::Tensor& h, int64_t m) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.is_cuda(),
              "hadamard_mma_kernel: x must be a contiguous [rows, n] CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "hadamard_mma_kernel: x must be bfloat16 or float16 (float32 rows: hadamard_kernel), got ", x.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "hadamard_mma_kernel: x must be 16-byte aligned");
  const int64_t n = x.size(1);
  TORCH_CHECK(m >= 2, "hadamard_mma_kernel: m = ", m, ": a power-of-two row has no factor (hadamard_kernel)");
  TORCH_CHECK(n <= roste::kMaxN, "hadamard_mma_kernel: n = ", n, " exceeds ", roste::kMaxN);   // before int casts
  roste::MmaPlan pl;
  TORCH_CHECK(n % m == 0 && m <= 16 * roste::kMmaMaxTiles && roste::make_mma_plan((int)m, (int)(n / m), &pl),
              "hadamard_mma_kernel: n = ", n, " = ", m, " x ", n / m, " is not served (m <= ", 16 * roste::kMmaMaxTiles,
              " and 16 ceil(m / 16) one of the compiled tile sizes, n / m = 2^k >= 8, n <= ", roste::kMaxN,
              ", n % 256 == 0)");
  const int64_t mp = (m + 15) / 16 * 16;
  TORCH_CHECK(h.dim() == 2 && h.size(0) == mp && h.size(1) == mp && h.is_contiguous() &&
                  h.scalar_type() == x.scalar_type() && h.device() == x.device() &&
                  reinterpret_cast<uintptr_t>(h.data_ptr()) % 4 == 0,
              "hadamard_mma_kernel: h must be the factor's ", mp, " x ", mp, " matrix (zero-padded), contiguous, in x's "
              "dtype, on x's device, 4-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  int major = 0, optin = 0;
  cudaError_t aerr = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  if (aerr == cudaSuccess)
    aerr = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index());
  TORCH_CHECK(aerr == cudaSuccess, "hadamard_mma_kernel: cannot query the device: ", cudaGetErrorString(aerr));
  TORCH_CHECK(major >= 8, "hadamard_mma_kernel: needs sm_80 or newer (bf16/fp16 mma.sync)");
  const int smem = roste::mma_smem_bytes(pl.m, pl.p);
  TORCH_CHECK(smem <= optin, "hadamard_mma_kernel: a row of ", n, " needs ", smem,
              " bytes of shared memory; this GPU allows ", optin);
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  cudaError_t err = roste::launch_hadamard_mma(x.data_ptr(), out.data_ptr(), h.data_ptr(), x.size(0), pl, (float)scale,
                                               x.scalar_type() == at::kBFloat16 ? FT_BF16 : FT_F16,
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "hadamard_mma_kernel: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) {
  m.impl("hadamard_kernel", &fusedtune::hadamard_cuda);
  m.impl("hadamard_mma_kernel", &fusedtune::hadamard_mma_cuda);
}
