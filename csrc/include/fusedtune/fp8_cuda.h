// Launch interface of the FP8 quantizer CUDA kernel (plain C++; the .cu needs no torch headers).
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace fusedtune {
namespace fp8 {

struct QuantArgs {
  const void* x;     // [M, K], row stride ld elements, unit column stride
  int64_t ld, M, K;
  uint8_t* q;        // [M, K] E4M3 bytes
  float* s;          // [M, KB] (block: [MB, KB])
  uint8_t* qc;       // [K, M]: the column-wise copy (block: q's bytes transposed); nullptr: none
  float* sc;         // [K, MB] (not block)
  int dt;            // FtDtype
  bool block, pow2;
};

// The kernel's terms (the dispatch checks them): M and K multiples of 8, x and its rows 16-byte aligned.
cudaError_t launch_quant(const QuantArgs& a, cudaStream_t stream);

}  // namespace fp8
}  // namespace fusedtune
