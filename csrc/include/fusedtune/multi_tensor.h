// Multi-tensor launches: one grid over a batch of tensors; block b works on the tensor whose
// block range [starts[i], starts[i+1]) holds b. Shared by the CUDA kernels of every family.
#pragma once
#include "fusedtune/common.h"

namespace fusedtune {

// Index of the last segment whose first block is <= b (starts is sorted, starts[0] == 0).
FT_HD int find_segment(const int64_t* starts, int count, int64_t b) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace fusedtune

namespace fusedtune {

// Host side: append one tensor's meta to a by-value launch struct (fields t[], block_start[],
// count); when the struct is full (or the grid would pass 2^30 blocks), launch it with fire(launch).
template <typename LaunchT, typename MetaT, typename Fire>
inline void batch_add(LaunchT& launch, const MetaT& meta, int64_t blocks, int max_tensors, Fire&& fire) {
  const int k = launch.count;
  launch.t[k] = meta;
  launch.block_start[k + 1] = launch.block_start[k] + blocks;
  launch.count = k + 1;
  if (launch.count == max_tensors || launch.block_start[launch.count] > (int64_t(1) << 30)) {
    fire(launch);
    launch.count = 0;
  }
}

template <typename LaunchT, typename Fire>
inline void batch_flush(LaunchT& launch, Fire&& fire) {
  if (launch.count) fire(launch);
  launch.count = 0;
}

}  // namespace fusedtune
