// Launch interface of the MaskedAdamW CUDA kernel (plain C++; the .cu needs no torch headers).
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/hft_math.h"

namespace fusedtune {
namespace hft {

constexpr int kMaxTensorsPerLaunch = 96;  // ~9 KB launch struct (CUDA >= 12.1 parameter limits)
constexpr int kThreads = 256;
constexpr int64_t kChunk = (int64_t)kThreads * 16;  // elements per block

struct TensorMeta {
  void* p;            // parameter (fp32 / bf16 / fp16)
  const void* g;      // gradient, same dtype as p
  float* m;           // exp_avg (fp32)
  float* v;           // exp_avg_sq (fp32)
  void* target;       // full weight to write updated rows into, or null
  const int64_t* rows;
  int64_t numel, cols;
  int32_t p_dtype, target_dtype;
};

struct Launch {
  TensorMeta t[kMaxTensorsPerLaunch];
  int64_t block_start[kMaxTensorsPerLaunch + 1];
  int32_t count;
};

inline int64_t blocks_for(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

cudaError_t launch_masked_adamw(const Launch& launch, const AdamConsts& c, cudaStream_t stream);

}  // namespace hft
}  // namespace fusedtune
