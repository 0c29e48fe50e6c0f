// Sparse-delta family, CUDA kernels of the tiled SDDMM (schedule and arithmetic in sddmm_tile.h):
// CSR row pointers of the sorted indices, one thread block per (tile, token split), and the sum of
// the splits' partial rows. Bit-identical to the CPU twin for the same plan.
#include <cuda_runtime.h>

#include "fusedtune/resident_blocks.h"
#include "fusedtune/sparse_delta_cuda.h"

namespace fusedtune {
namespace sparse_delta {
namespace {

constexpr int kFlatThreads = 256;

__global__ void __launch_bounds__(kFlatThreads) csr_kernel(const sddmm::Problem P, int32_t* row_ptr) {
  const int64_t e = (int64_t)blockIdx.x * kFlatThreads + threadIdx.x;
  if (e <= P.k) sddmm::csr_entry(P.idx, P.k, P.K, P.N, e, row_ptr);
}

template <int DT>
__global__ void __launch_bounds__(sddmm::kThreads, 2) sddmm_tile_kernel(const sddmm::Problem P, const sddmm::Plan plan) {
  extern __shared__ __align__(16) unsigned char smem[];
  const sddmm::Tile t = sddmm::make_tile(P, plan, blockIdx.x, blockIdx.y, (int32_t)blockIdx.z, smem, DT == FT_F32 ? 4 : 2);
  const int tid = threadIdx.x;
  sddmm::phase_count(P, t, tid);
  __syncthreads();
  for (int j = 0; j < sddmm::kLogThreads; ++j) {
    sddmm::phase_scan(t, j, tid);
    __syncthreads();
  }
  sddmm::phase_offsets(t, tid);
  __syncthreads();
  const int32_t total = sddmm::tile_items(t);
  for (int32_t b0 = 0; b0 < total; b0 += plan.cap) {
    const int32_t nb = min(plan.cap, total - b0);
    sddmm::phase_fill(P, t, b0, nb, tid);
    __syncthreads();
    for (int64_t t0 = t.t_beg; t0 < t.t_end; t0 += sddmm::kTc) {
      sddmm::phase_stage<DT>(P, t, t0, tid);
      __syncthreads();
      sddmm::phase_dot<DT>(t, nb, tid);
      __syncthreads();
    }
    sddmm::phase_write(P, t, b0, nb, tid);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kFlatThreads) reduce_kernel(const float* partial, int64_t k, int32_t splits, float* out) {
  const int64_t p = (int64_t)blockIdx.x * kFlatThreads + threadIdx.x;
  if (p < k) out[p] = sddmm::reduce_entry(partial, k, splits, p);
}

template <int DT>
cudaError_t launch_tiles(const sddmm::Problem& P, const sddmm::Plan& plan, cudaStream_t stream) {
  const size_t smem = sddmm::layout(plan, DT == FT_F32 ? 4 : 2).total;
  // the kernel's one opt-in to all the shared memory a block can have, once per device (resident_blocks.h): a
  // per-call opt-in to this plan's size raced with another thread's launch of another plan size
  int64_t blocks = 0;
  int optin = 0;
  cudaError_t err = resident_blocks((const void*)sddmm_tile_kernel<DT>, sddmm::kThreads, (int)smem, &blocks, &optin);
  if (err != cudaSuccess) return err;
  if ((int64_t)smem > optin) return cudaErrorInvalidValue;   // (the planner keeps to the device's limit)
  // the plan sizes tiles for two blocks per SM: ask for the largest shared-memory carveout
  err = cudaFuncSetAttribute(sddmm_tile_kernel<DT>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)((P.K + plan.C - 1) / plan.C), (unsigned)((P.N + plan.R - 1) / plan.R), (unsigned)plan.splits);
  sddmm_tile_kernel<DT><<<grid, sddmm::kThreads, smem, stream>>>(P, plan);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sddmm(const sddmm::Problem& P, const sddmm::Plan& plan, int dt, float* out, cudaStream_t stream) {
  csr_kernel<<<(unsigned)((P.k + kFlatThreads) / kFlatThreads), kFlatThreads, 0, stream>>>(P, const_cast<int32_t*>(P.row_ptr));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = dt == FT_F32 ? launch_tiles<FT_F32>(P, plan, stream)
                     : (dt == FT_BF16 ? launch_tiles<FT_BF16>(P, plan, stream) : launch_tiles<FT_F16>(P, plan, stream));
  if (err != cudaSuccess || plan.splits == 1) return err;
  reduce_kernel<<<(unsigned)((P.k + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(P.partial, P.k, plan.splits, out);
  return cudaGetLastError();
}

}  // namespace sparse_delta
}  // namespace fusedtune
