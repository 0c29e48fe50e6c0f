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
