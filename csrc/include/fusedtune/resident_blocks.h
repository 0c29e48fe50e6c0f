// Host side of the persistent-grid kernels (the Hadamard warp and block kernels, the FP8 quantizer): how
// many blocks of a kernel run at once on the current device, asked once per (device, kernel, threads,
// dynamic shared memory), after the kernel's one opt-in to all the shared memory a block can have (one
// setting for every size, set before any launch or query there, so concurrent launches of different sizes
// cannot undo each other's and no query sees another's limit).
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include <mutex>
#include <vector>

namespace fusedtune {

// *out: SMs x blocks an SM of `kernel` at `threads` a block and `smem` dynamic bytes (0: it does not fit);
// *optin (if given): the dynamic shared memory a block that the kernel is opted into -- the device's limit a
// block less the kernel's static shared memory (CUDA refuses an opt-in whose sum with the static part
// exceeds the limit). On an error the runtime's sticky last error is cleared, so that a caller which
// reports it does not leave it to the next, unrelated launch check.
inline cudaError_t resident_blocks(const void* kernel, int threads, int smem, int64_t* out, int* optin = nullptr) {
  struct Entry {
    int dev, threads, smem;                     // threads -1: the opt-in entry (smem: the limit)
    const void* kernel;
    int64_t blocks;
  };
  static std::mutex mu;
  static std::vector<Entry> seen;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  int limit = -1;
  bool known = false;
  for (const Entry& e : seen) {
    if (e.dev != dev || e.kernel != kernel) continue;
    if (e.threads == -1) limit = e.smem;
    if (e.threads == threads && e.smem == smem) {
      known = true;
      *out = e.blocks;
    }
  }
  if (limit < 0) {
    cudaFuncAttributes fa;
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&fa, kernel);
    if (err == cudaSuccess) {
      limit -= static_cast<int>(fa.sharedSizeBytes);
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      return err;
    }
    seen.push_back(Entry{dev, -1, limit, kernel, 0});
  }
  if (optin != nullptr) *optin = limit;
  if (!known) {
    int sms = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return err;
    }
    *out = (int64_t)sms * per_sm;
    if (seen.size() < 512) seen.push_back(Entry{dev, threads, smem, kernel, *out});
  }
  return cudaSuccess;
}

}  // namespace fusedtune
