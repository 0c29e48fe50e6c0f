// Launch interface of the butterfly Hadamard CUDA kernel (plain C++; the .cu needs no torch headers).
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/hadamard_math.h"

namespace fusedtune {
namespace roste {

// rows x n (n = pl.m * pl.p) contiguous rows of dtype dt (16-byte aligned), out likewise; transpose: H_m^T
// (hadamard_factors.h's H_m) for the backward.
cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                            int dt, cudaStream_t stream);

// The tensor-core factor kernel (roste_mma.cu): 16-bit rows of n = m * p, m > 1 compiled (pl from make_plan).
// Its shared memory: Y [m][p + kMmaPad] fp32 and X [16 * ceil(m / 16)][p + kMmaPad] 16-bit.
constexpr int kMmaPad = 8;
inline int mma_smem_bytes(int m, int p) {
  return (m * 4 + (m + 15) / 16 * 16 * 2) * (p + kMmaPad);
}
cudaError_t launch_hadamard_mma(const void* x, void* out, int64_t rows, const Plan& pl, bool transpose, float scale,
                                int dt, cudaStream_t stream);

}  // namespace roste
}  // namespace fusedtune
