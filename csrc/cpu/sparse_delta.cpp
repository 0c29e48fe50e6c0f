// Sparse-delta family, C++ CPU kernels: SparseDeltaAdamW (math in sparse_delta_element.h) and the twin of
// the tiled SDDMM CUDA kernel (sddmm_tile.h: each tile runs the kernel's phases for every thread id in
// turn, so it computes the very same sums in the very same order).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedtune/sparse_delta_checks.h"
#include "fusedtune/sparse_delta_element.h"

namespace fusedtune {
namespace {

void sparse_adamw_cpu(at::TensorList values, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList weights, at::TensorList bases,
                      at::TensorList indices, at::TensorList steps, at::ArrayRef<double> consts) {
  sparse_delta_check(values, grads, exp_avgs, exp_avg_sqs, weights, bases, indices, steps);
  sparse_delta::OwnSteps own;
  const AdamConsts c = sparse_delta_consts(consts, own);
  for (size_t i = 0; i < values.size(); ++i) {
    float* val = values[i].data_ptr<float>();
    const float* g = grads[i].data_ptr<float>();
    float *m = exp_avgs[i].data_ptr<float>(), *v = exp_avg_sqs[i].data_ptr<float>();
    void* w = weights[i].data_ptr();
    const void* base = bases[i].data_ptr();
    const int32_t* idx = indices[i].data_ptr<int32_t>();
    int32_t* st = sparse_delta_steps_ptr(steps, i);
    const int wdt = sparse_delta_weight_dtype(weights[i]);
    at::parallel_for(0, values[i].numel(), 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        sparse_delta::sparse_adamw_element(val, g, m, v, w, base, idx, st, wdt, e, c, own);
    });
  }
}

template <int DT>
void sddmm_tile_cpu(const sddmm::Problem& P, const sddmm::Plan& plan, int64_t col_tile, int64_t row_tile,
                    int32_t split, unsigned char* smem) {
  using namespace sddmm;
  const Tile t = make_tile(P, plan, col_tile, row_tile, split, smem, DT == FT_F32 ? 4 : 2);
  for (int tid = 0; tid < kThreads; ++tid) phase_count(P, t, tid);
  for (int j = 0; j < kLogThreads; ++j)
    for (int tid = 0; tid < kThreads; ++tid) phase_scan(t, j, tid);
  for (int tid = 0; tid < kThreads; ++tid) phase_offsets(t, tid);
  const int32_t total = tile_items(t);
  for (int32_t b0 = 0; b0 < total; b0 += plan.cap) {
    const int32_t nb = std::min(plan.cap, total - b0);
    for (int tid = 0; tid < kThreads; ++tid) phase_fill(P, t, b0, nb, tid);
    for (int64_t t0 = t.t_beg; t0 < t.t_end; t0 += kTc) {
      for (int tid = 0; tid < kThreads; ++tid) phase_stage<DT>(P, t, t0, tid);
      for (int tid = 0; tid < kThreads; ++tid) phase_dot<DT>(t, nb, tid);
    }
    for (int tid = 0; tid < kThreads; ++tid) phase_write(P, t, b0, nb, tid);
  }
}

at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices, at::IntArrayRef plan_) {
  sddmm::Problem P;
  sddmm::Plan plan;
  const int dt = sddmm_check(dy, x, indices, plan_, P, plan);
  TORCH_CHECK(x.device().is_cpu(), "sddmm_kernel: the CPU kernel got tensors on ", x.device());
  const SddmmBuffers bufs = sddmm_buffers(dy, x, indices, plan, P);
  if (P.k == 0) return bufs.out;
  int32_t* rp = bufs.row_ptr.data_ptr<int32_t>();
  for (int64_t e = 0; e <= P.k; ++e) sddmm::csr_entry(P.idx, P.k, P.K, P.N, e, rp);
  const int64_t col_tiles = (P.K + plan.C - 1) / plan.C, row_tiles = (P.N + plan.R - 1) / plan.R;
  const size_t smem = sddmm::layout(plan, x.element_size()).total;
  at::parallel_for(0, col_tiles * row_tiles * plan.splits, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> scratch((smem + 7) / 8);
    unsigned char* s = reinterpret_cast<unsigned char*>(scratch.data());
    for (int64_t i = b; i < e; ++i) {
      const int64_t ct = i % col_tiles, rt = (i / col_tiles) % row_tiles;
      const int32_t sp = (int32_t)(i / (col_tiles * row_tiles));
      if (dt == FT_F32) sddmm_tile_cpu<FT_F32>(P, plan, ct, rt, sp, s);
      else if (dt == FT_BF16) sddmm_tile_cpu<FT_BF16>(P, plan, ct, rt, sp, s);
      else sddmm_tile_cpu<FT_F16>(P, plan, ct, rt, sp, s);
    }
  });
  if (plan.splits > 1) {
    float* o = bufs.out.data_ptr<float>();
    at::parallel_for(0, P.k, 16384, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) o[p] = sddmm::reduce_entry(P.partial, P.k, plan.splits, p);
    });
  }
  return bufs.out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) {
  m.impl("sparse_adamw_kernel_", &fusedtune::sparse_adamw_cpu);
  m.impl("sddmm_kernel", &fusedtune::sddmm_cpu);
}
