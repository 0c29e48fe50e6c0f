// Zeroth-order family, C++ CPU kernel: the math of zo_math.h walked with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fusedtune/zo_checks.h"
#include "fusedtune/zo_math.h"

namespace fusedtune {
namespace {

const float kTable[FT_ZO_TABLE_N + 1] = {FT_ZO_TABLE_VALUES};

// One tensor, for a call of fixed shape MODE/NOISE/ROUND (zo_math.h dispatch_mode: the same code the
// CUDA kernel runs for such calls).
template <typename T>
struct TensorRun {
  const zo::Params& p;
  const zo::OneSeed o;
  T* data;
  int64_t numel;
  uint32_t tid;
  int dt;

  template <int MODE, int NOISE, int ROUND>
  void operator()() const {
    const int64_t groups = (numel + 3) / 4;
    at::parallel_for(0, groups, 4096, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = g * 4;
        const int cnt = (int)std::min<int64_t>(4, numel - base);
        uint32_t bits[4] = {0, 0, 0, 0};
        for (int k = 0; k < cnt; ++k) bits[k] = (uint32_t)data[base + k];
        zo::update_any<MODE, NOISE, ROUND>(p, o, kTable, (uint64_t)g, tid, dt, bits, cnt);
        for (int k = 0; k < cnt; ++k) data[base + k] = (T)bits[k];
      }
    });
  }
};

template <typename T>
void run_tensor(const zo::Params& p, T* data, int64_t numel, uint32_t tid, int dt) {
  const int mode = zo::call_mode(p);
  zo::dispatch_mode(p, mode, TensorRun<T>{p, zo::one_seed(p, mode), data, numel, tid, dt});
}

void zo_apply_cpu(at::TensorList tensors, at::IntArrayRef tensor_ids, const at::Tensor& seeds,
                  const at::Tensor& coeffs, const at::Tensor& prev_seeds, const at::Tensor& prev_coeffs,
                  double alpha, int64_t noise, int64_t rounding, int64_t rounding_seed) {
  zo_check_args(tensors, tensor_ids, seeds, coeffs, prev_seeds, prev_coeffs, noise, rounding);
  auto s = seeds.contiguous(), c = coeffs.contiguous(), ps = prev_seeds.contiguous(), pc = prev_coeffs.contiguous();
  zo::Params p = zo_make_params(s, c, ps, pc, alpha, noise, rounding, rounding_seed);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int dt = zo_dtype_code(t);
    const uint32_t tid = (uint32_t)tensor_ids[i];
    if (dt == FT_F32)
      run_tensor(p, (uint32_t*)t.data_ptr(), t.numel(), tid, dt);
    else
      run_tensor(p, (uint16_t*)t.data_ptr(), t.numel(), tid, dt);
  }
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("zo_apply_kernel_", &fusedtune::zo_apply_cpu); }
