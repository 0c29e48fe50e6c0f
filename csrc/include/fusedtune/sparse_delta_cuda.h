// Launch interfaces of the sparse-delta CUDA kernels, SparseDeltaAdamW and the tiled SDDMM (plain C++;
// the .cu files need no torch headers).
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/adamw_math.h"
#include "fusedtune/sddmm_tile.h"
#include "fusedtune/sparse_delta_element.h"

namespace fusedtune {
namespace sparse_delta {

constexpr int kMaxTensorsPerLaunch = 96;
constexpr int kThreads = 256;
constexpr int64_t kChunk = (int64_t)kThreads * 16;

struct TensorMeta {
  float* values;
  const float* grads;
  float* m;
  float* v;
  void* weight;
  const void* base;
  const int32_t* indices;
  int32_t* steps;  // per-element step counts, or nullptr
  int64_t numel;
  int32_t weight_dtype;
};

struct Launch {
  TensorMeta t[kMaxTensorsPerLaunch];
  int64_t block_start[kMaxTensorsPerLaunch + 1];
  int32_t count;
};

inline int64_t blocks_for(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

cudaError_t launch_sparse_adamw(const Launch& launch, const AdamConsts& c, const OwnSteps& own, cudaStream_t stream);

// Tiled SDDMM (sddmm_tile.h): CSR row pointers into P.row_ptr, the tiles' partial sums into
// P.partial, and, with splits > 1, their sum into out. dt: FT_F32 / FT_BF16 / FT_F16.
cudaError_t launch_sddmm(const sddmm::Problem& P, const sddmm::Plan& plan, int dt, float* out, cudaStream_t stream);

}  // namespace sparse_delta
}  // namespace fusedtune
