// Sparse-delta family, CUDA kernel of SparseDeltaAdamW: one grid over all layers' deltas; updates
// deltas and moments and scatters round(base + delta) into the merged weights (bit-identical to the
// CPU kernel and the reference).
#include <cuda_runtime.h>

#include "fusedtune/multi_tensor.h"
#include "fusedtune/sparse_delta_cuda.h"
#include "fusedtune/sparse_delta_element.h"

namespace fusedtune {
namespace sparse_delta {

__global__ void __launch_bounds__(kThreads) sparse_adamw_kernel(const __grid_constant__ Launch launch,
                                                                const AdamConsts c, const OwnSteps own) {
  const int64_t b = blockIdx.x;
  const int ti = find_segment(launch.block_start, launch.count, b);
  const TensorMeta t = launch.t[ti];
  const int64_t e0 = (b - launch.block_start[ti]) * kChunk;
  const int64_t end = min(t.numel, e0 + kChunk);
  for (int64_t e = e0 + threadIdx.x; e < end; e += kThreads)
    sparse_adamw_element(t.values, t.grads, t.m, t.v, t.weight, t.base, t.indices, t.steps, t.weight_dtype, e, c,
                         own);
}

cudaError_t launch_sparse_adamw(const Launch& launch, const AdamConsts& c, const OwnSteps& own, cudaStream_t stream) {
  const int64_t blocks = launch.block_start[launch.count];
  if (blocks == 0) return cudaSuccess;
  sparse_adamw_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(launch, c, own);
  return cudaGetLastError();
}

}  // namespace sparse_delta
}  // namespace fusedtune
