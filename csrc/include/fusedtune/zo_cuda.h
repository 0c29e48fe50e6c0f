// Launch interface of the zo CUDA kernel; plain C++ so that the .cu file needs no torch headers.
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/zo_math.h"

namespace fusedtune {
namespace zo {

// One launch covers up to this many tensors (a 7B Llama has 291): the by-value launch struct is
// ~10 KB, which needs CUDA >= 12.1 kernel-parameter limits (32 KB on sm_70+; all our targets).
constexpr int kMaxTensorsPerLaunch = 320;
constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;                                   // 16 bytes of bf16/fp16
// Elements a block takes at a time: 16 iterations of its loop. A chunk's first load is waited for (the loop
// prefetches within a chunk), so at 4 iterations (8192 elements, the H200's measured runs) one load in four
// had nothing issued ahead of it.
constexpr int64_t kChunk = (int64_t)kThreads * kElemsPerThread * 16;

struct TensorMeta {
  void* ptr;
  int64_t numel;
  uint32_t tensor_id;
  int32_t dtype;
};

struct Launch {
  TensorMeta t[kMaxTensorsPerLaunch];
  int64_t block_start[kMaxTensorsPerLaunch + 1];  // prefix sums of blocks per tensor
  int32_t count;
};

inline int64_t blocks_for(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Returns cudaSuccess or the launch error.
cudaError_t launch_apply(const Launch& launch, const Params& p, cudaStream_t stream);

}  // namespace zo
}  // namespace fusedtune
