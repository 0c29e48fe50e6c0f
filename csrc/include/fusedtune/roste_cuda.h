// Launch interface of the butterfly Hadamard CUDA kernel (plain C++; the .cu needs no torch headers).
#pragma once
#include <cuda_runtime_api.h>

#include "fusedtune/hadamard_math.h"

namespace fusedtune {
namespace roste {

struct Signs {
  uint64_t neg[kMaxM];
};

// rows x n (n = pl.m * pl.p) contiguous rows of dtype dt (16-byte aligned), out likewise.
cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, const Plan& pl, const Signs& sg, float scale,
                            int dt, cudaStream_t stream);

}  // namespace roste
}  // namespace fusedtune
