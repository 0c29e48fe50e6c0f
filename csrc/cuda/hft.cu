// Half-fine-tuning family, CUDA kernel of MaskedAdamW: one grid over all tensors, the element
// rule of hft_element.h (bit-identical to the CPU kernel and the reference).
#include <cuda_runtime.h>

#include "fusedtune/hft_cuda.h"
#include "fusedtune/hft_element.h"
#include "fusedtune/multi_tensor.h"

namespace fusedtune {
namespace hft {

__global__ void __launch_bounds__(kThreads) masked_adamw_kernel(const __grid_constant__ Launch launch,
                                                                const AdamConsts c) {
  const int64_t b = blockIdx.x;
  const int ti = find_segment(launch.block_start, launch.count, b);
  const TensorMeta t = launch.t[ti];
  const int64_t e0 = (b - launch.block_start[ti]) * kChunk;
  const int64_t end = min(t.numel, e0 + kChunk);
  for (int64_t e = e0 + threadIdx.x; e < end; e += kThreads)
    masked_adamw_element(t.p, t.g, t.m, t.v, t.target, t.rows, t.cols, t.p_dtype, t.target_dtype, e, c);
}

cudaError_t launch_masked_adamw(const Launch& launch, const AdamConsts& c, cudaStream_t stream) {
  const int64_t blocks = launch.block_start[launch.count];
  if (blocks == 0) return cudaSuccess;
  masked_adamw_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(launch, c);
  return cudaGetLastError();
}

}  // namespace hft
}  // namespace fusedtune
