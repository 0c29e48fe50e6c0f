// Zeroth-order family, CUDA kernel: one grid over a batch of tensors, 16-byte accesses, the math
// of zo_math.h (bit-identical to the CPU kernel). Light headers only: no torch includes here.
#include <cuda_runtime.h>

#include "fusedtune/multi_tensor.h"
#include "fusedtune/vec8.cuh"
#include "fusedtune/zo_cuda.h"

namespace fusedtune {
namespace zo {

__device__ const float kTableDev[FT_ZO_TABLE_N + 1] = {FT_ZO_TABLE_VALUES};

// One 16-byte store (p 16-byte aligned). A uint4 assignment here compiled to four 32-bit stores (fp32: eight)
// in the PTX: the compiler split the struct and did not merge the parts again.
__device__ __forceinline__ void st_global_v4(void* p, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}

// The kElemsPerThread elements at e as they are stored: one 16-byte vector (two for fp32).
template <int DT>
struct Vec {
  uint4 q[DT == FT_F32 ? 2 : 1];
};

// a: elements 0..3, b: 4..7 (storage bits)
template <int DT>
__device__ __forceinline__ void vec_unpack(const Vec<DT>& v, uint32_t a[4], uint32_t b[4]) {
  if constexpr (DT == FT_F32) {
    const uint4 v0 = v.q[0], v1 = v.q[1];
    a[0] = v0.x; a[1] = v0.y; a[2] = v0.z; a[3] = v0.w;
    b[0] = v1.x; b[1] = v1.y; b[2] = v1.z; b[3] = v1.w;
  } else {
    const uint4 w = v.q[0];
    a[0] = w.x & 0xFFFFu; a[1] = w.x >> 16; a[2] = w.y & 0xFFFFu; a[3] = w.y >> 16;
    b[0] = w.z & 0xFFFFu; b[1] = w.z >> 16; b[2] = w.w & 0xFFFFu; b[3] = w.w >> 16;
  }
}

template <int DT>
__device__ __forceinline__ void vec_store(void* base, int64_t e, const uint32_t a[4], const uint32_t b[4]) {
  if constexpr (DT == FT_F32) {
    uint32_t* p = static_cast<uint32_t*>(base) + e;
    st_global_v4(p, a[0], a[1], a[2], a[3]);
    st_global_v4(p + 4, b[0], b[1], b[2], b[3]);
  } else {
    st_global_v4(static_cast<uint16_t*>(base) + e, a[0] | (a[1] << 16), a[2] | (a[3] << 16), b[0] | (b[1] << 16),
                 b[2] | (b[3] << 16));
  }
}

template <int DT, int MODE, int NOISE, int ROUND>
__device__ __forceinline__ void scalar_group(const Params& p, const OneSeed& o, const float* table, void* base,
                                             int64_t numel, uint64_t g, uint32_t tid) {
  const int64_t e0 = (int64_t)g * 4;
  if (e0 >= numel) return;
  const int cnt = (int)min((int64_t)4, numel - e0);
  uint32_t bits[4] = {0, 0, 0, 0};
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k < cnt) bits[k] = DT == FT_F32 ? static_cast<uint32_t*>(base)[e0 + k] : static_cast<uint16_t*>(base)[e0 + k];
  update_any<MODE, NOISE, ROUND>(p, o, table, g, tid, DT, bits, cnt);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (k < cnt) {
      if (DT == FT_F32)
        static_cast<uint32_t*>(base)[e0 + k] = bits[k];
      else
        static_cast<uint16_t*>(base)[e0 + k] = (uint16_t)bits[k];
    }
  }
}

// Iterations of an fp32 chunk in flight a thread (run_chunk); a 16-bit chunk's iteration is one vector
// instead of two, so the same ring holds twice as many of them. sm_89 has 100 KB of shared memory an SM: a
// 4-deep ring (36 KB a block with the table) would leave 2 blocks an SM there, a 2-deep one keeps 4.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 890
constexpr int kDepth = 2;
#else
constexpr int kDepth = 4;
#endif
template <int DT>
constexpr int ring_depth() { return DT == FT_F32 ? kDepth : 2 * kDepth; }
static_assert(kChunk / ((int64_t)kThreads * kElemsPerThread) >= 2 * kDepth, "a chunk fills the ring");

// A block's staging ring: 2 * kDepth slots of 16 bytes a thread, slot s of all threads side by side. Iteration
// it of a chunk takes slots (it % depth) * kV + k, k < kV (kV: its vectors, 2 for fp32).
struct Stage {
  uint4 v[2 * kDepth][kThreads];
};

template <int DT, int MODE, int NOISE, int ROUND>
__device__ __forceinline__ void run_chunk(const Params& p, const OneSeed& o, const float* table, const TensorMeta& m,
                                          int64_t chunk0, Stage& stage) {
  const int64_t end = min(m.numel, chunk0 + kChunk);
  const bool aligned = (reinterpret_cast<uintptr_t>(m.ptr) & 15u) == 0;
  constexpr int64_t kStep = (int64_t)kThreads * kElemsPerThread;
  // A whole chunk of an aligned tensor: a thread's vectors come in by cp.async through its own slots of a
  // ring (no barrier), kD iterations ahead of the arithmetic (8 for 16-bit tensors, 4 for fp32; half on
  // sm_89), so kD loads of each thread are in flight while it computes: at 4 blocks of 256 threads an SM,
  // 128 KB of bf16 an SM, above the ~70 KB that 2 us of latency at the H200's 4.8 TB/s asks of each of its
  // 132 SMs (the MODE_NEXT kernel, 3 blocks: 96 KB). H200, fourth run: with one vector prefetched in
  // registers (one load in flight a thread: 16 KB an SM at 4 blocks of 256) the one-seed pass took 12.6 ms
  // against a copy's 9.4 and about 6.8 ms of issue -- its reads ran as if each load took 2 us, bound by
  // loads in flight.
  // Before that, each vector was loaded after the previous one's arithmetic (1974 GB/s against torch's 2818
  // for the same bytes, bench/results/zo.csv).
  if (aligned && chunk0 + kChunk <= m.numel) {
    constexpr int kIters = (int)(kChunk / kStep);
    constexpr int kV = DT == FT_F32 ? 2 : 1;
    constexpr int kD = ring_depth<DT>();
    constexpr int64_t es = DT == FT_F32 ? 4 : 2;
    const int64_t e0 = chunk0 + (int64_t)threadIdx.x * kElemsPerThread;
    const char* src = static_cast<const char*>(m.ptr) + e0 * es;
    FT_UNROLL
    for (int it = 0; it < kD; ++it) {
      copy_chunk_async<kV>(&stage.v[it * kV][threadIdx.x], src + it * kStep * es, kThreads);
      commit_copies();
    }
#pragma unroll 1
    for (int it = 0; it < kIters; ++it) {
      wait_copies_but<kD - 1>();               // iteration it's group (one committed every iteration)
      const int slot = (it % kD) * kV;
      Vec<DT> cur;
      FT_UNROLL
      for (int k = 0; k < kV; ++k) cur.q[k] = stage.v[slot + k][threadIdx.x];
      // the slot is re-filled after this thread's read of it, in program order (the copies' "memory" clobber
      // keeps the compiler from moving the read below them; the hardware performs a thread's shared-memory
      // read before a later copy's write to the same address, which lands only when its global load returns)
      if (it + kD < kIters)
        copy_chunk_async<kV>(&stage.v[slot][threadIdx.x], src + (it + kD) * kStep * es, kThreads);
      commit_copies();                         // (empty at the end: the count per iteration stays one)
      const int64_t e = e0 + it * kStep;
      uint32_t a[4], b[4];
      vec_unpack<DT>(cur, a, b);
      update_any<MODE, NOISE, ROUND>(p, o, table, (uint64_t)(e >> 2), m.tensor_id, DT, a, 4);
      update_any<MODE, NOISE, ROUND>(p, o, table, (uint64_t)(e >> 2) + 1, m.tensor_id, DT, b, 4);
      vec_store<DT>(m.ptr, e, a, b);
    }
    return;
  }
  // a tensor's last chunk when it is partial, or a tensor that is not 16-byte aligned: element by element
  for (int64_t e = chunk0 + (int64_t)threadIdx.x * kElemsPerThread; e < end; e += kStep) {
    scalar_group<DT, MODE, NOISE, ROUND>(p, o, table, m.ptr, end, (uint64_t)(e >> 2), m.tensor_id);
    scalar_group<DT, MODE, NOISE, ROUND>(p, o, table, m.ptr, end, (uint64_t)(e >> 2) + 1, m.tensor_id);
  }
}

// The chunks of one block (below), for a call of fixed shape MODE/NOISE/ROUND (zo_math.h dispatch_mode).
struct Walk {
  const Launch& launch;
  const Params& p;
  const OneSeed o;
  const float* table;
  Stage& stage;

  template <int MODE, int NOISE, int ROUND>
  __device__ __forceinline__ void operator()() const {
    const int64_t total = launch.block_start[launch.count];
    int64_t b = blockIdx.x;
    int ti = find_segment(launch.block_start, launch.count, b);
    for (; b < total; b += gridDim.x) {
      while (launch.block_start[ti + 1] <= b) ++ti;
      const TensorMeta& m = launch.t[ti];
      const int64_t chunk0 = (b - launch.block_start[ti]) * kChunk;
      if (m.dtype == FT_F32)
        run_chunk<FT_F32, MODE, NOISE, ROUND>(p, o, table, m, chunk0, stage);
      else if (m.dtype == FT_BF16)
        run_chunk<FT_BF16, MODE, NOISE, ROUND>(p, o, table, m, chunk0, stage);
      else
        run_chunk<FT_F16, MODE, NOISE, ROUND>(p, o, table, m, chunk0, stage);
    }
  }
};

// A block walks chunks b = blockIdx.x, + gridDim.x, ... (the grid is a few blocks per SM): the quantile
// table is copied into shared memory once per block, not once per chunk as with one block per chunk of
// 8192 elements before (4 KB from L2 and a barrier for every 16 KB of bf16 weights), and the tensor lookup
// is a forward walk from the previous chunk's tensor. Which element a thread updates never enters the math (the
// counter is the element index), so the result is the same bits for any grid. MODES: the fixed call shapes
// this kernel compiles (zo_math.h dispatch_mode); any other call takes the generic path.
template <int MODES>
__device__ __forceinline__ void apply_chunks(const Launch& launch, const Params& p, float* table, Stage& stage) {
  for (int i = threadIdx.x; i <= FT_ZO_TABLE_N; i += blockDim.x) table[i] = kTableDev[i];
  __syncthreads();
  if ((int64_t)blockIdx.x >= launch.block_start[launch.count]) return;
  const int mode = call_mode(p);
  dispatch_mode<MODES>(p, mode, Walk{launch, p, one_seed(p, mode), table, stage});
}

__global__ void __launch_bounds__(kThreads, 4) zo_apply_kernel(const __grid_constant__ Launch launch, const Params p) {
  __shared__ float table[FT_ZO_TABLE_N + 1];
  __shared__ Stage stage;                       // 32 KB (sm_89: 16 KB)
  apply_chunks<MODES_ONE_SAME>(launch, p, table, stage);
}

// Calls of two seeds undoing the first (MODE_NEXT, a folded MeZO's last pass). Its loop holds the second
// draw's products through the first draw: at 64 registers (4 blocks an SM) ptxas spilled, so it is a kernel
// of its own, at 3 blocks an SM (up to 85 registers; 80 on sm_80 and sm_90a, 78 on sm_89).
__global__ void __launch_bounds__(kThreads, 3) zo_apply_kernel_next(const __grid_constant__ Launch launch,
                                                                    const Params p) {
  __shared__ float table[FT_ZO_TABLE_N + 1];
  __shared__ Stage stage;
  apply_chunks<MODES_NEXT>(launch, p, table, stage);
}

// Blocks of the grid: as many as are resident at once on all SMs (the occupancy of the kernel, whose
// register count differs per architecture), at most one per chunk; read once per device and kernel.
template <typename Kernel>
static int64_t grid_blocks(int64_t chunks, Kernel kernel, int (&resident)[64]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return chunks;
  if (resident[dev] == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess ||
        sms <= 0 || per_sm <= 0) {
      (void)cudaGetLastError();   // a failed query must not read as the launch's error
      return chunks;
    }
    resident[dev] = sms * per_sm;
  }
  return chunks < resident[dev] ? chunks : resident[dev];
}

cudaError_t launch_apply(const Launch& launch, const Params& p, cudaStream_t stream) {
  static int resident[64] = {0}, resident_next[64] = {0};
  const int64_t chunks = launch.block_start[launch.count];
  if (chunks == 0) return cudaSuccess;
  // the host knows the counts, not the seeds (device memory): two seeds and one undone go to the kernel
  // that compiles MODE_NEXT (the generic path when the seeds differ)
  if (p.n == 2 && p.n_prev == 1)
    zo_apply_kernel_next<<<(unsigned)grid_blocks(chunks, zo_apply_kernel_next, resident_next), kThreads, 0, stream>>>(
        launch, p);
  else
    zo_apply_kernel<<<(unsigned)grid_blocks(chunks, zo_apply_kernel, resident), kThreads, 0, stream>>>(launch, p);
  return cudaGetLastError();
}

}  // namespace zo
}  // namespace fusedtune
