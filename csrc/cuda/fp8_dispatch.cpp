// FP8 family: CUDA dispatch-key registration of the quantizer kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedtune/fp8_checks.h"
#include "fusedtune/fp8_cuda.h"

namespace fusedtune {
namespace {

Fp8Outputs fp8_quant_cuda(const at::Tensor& x, bool block, bool copy, bool pow2) {
  fp8::QuantArgs a;
  a.dt = fp8_check(x);
  TORCH_CHECK(x.is_cuda(), "fp8_quant_kernel: x must be a CUDA tensor");
  if (x.numel() == 0) return fp8_outputs(x, block, copy);
  const int64_t es = x.element_size();
  TORCH_CHECK(x.size(0) % 8 == 0 && x.size(1) % 8 == 0, "fp8_quant_kernel: the CUDA kernel takes M and K that are "
              "multiples of 8, got ", x.size(0), " x ", x.size(1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.size(0) <= 1 || (x.stride(0) * es) % 16 == 0),
              "fp8_quant_kernel: the CUDA kernel needs x and its rows 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  Fp8Outputs out = fp8_outputs(x, block, copy);
  a.x = x.data_ptr();
  a.ld = x.size(0) <= 1 ? x.size(1) : x.stride(0);
  a.M = x.size(0);
  a.K = x.size(1);
  a.q = static_cast<uint8_t*>(std::get<0>(out).data_ptr());
  a.s = std::get<1>(out).data_ptr<float>();
  a.qc = copy ? static_cast<uint8_t*>(std::get<2>(out).data_ptr()) : nullptr;
  a.sc = copy && !block ? std::get<3>(out).data_ptr<float>() : nullptr;
  a.block = block;
  a.pow2 = pow2;
  cudaError_t err = fp8::launch_quant(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fp8_quant_kernel: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CUDA, m) { m.impl("fp8_quant_kernel", &fusedtune::fp8_quant_cuda); }
