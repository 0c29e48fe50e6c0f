// RoSTE family, C++ CPU kernel of the butterfly Hadamard transform: the CUDA kernel's stage plan and
// arithmetic (hadamard_math.h) with the lane exchanges done through memory.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "fusedtune/roste_checks.h"

namespace fusedtune {
namespace {

template <int M, bool T>
void transform_row(const void* xr, void* outr, const HadamardArgs& a, float scale, float* s, float* t) {
  const roste::Plan& pl = a.plan;
  const int n = pl.m * pl.p;
  const int chunks = n / roste::kE;
  for (int c = 0; c < chunks; ++c) {            // registers: load, bits 0..2
    float v[roste::kE];
    for (int e = 0; e < roste::kE; ++e) v[e] = load_as_f32(load_bits(xr, (int64_t)c * roste::kE + e, a.dt), a.dt);
    roste::butterfly8(v);
    for (int e = 0; e < roste::kE; ++e) s[c * roste::kE + e] = v[e];
  }
  for (int st = 0; st < pl.shfl; ++st) {        // lanes: chunk c's partner is c ^ (1 << st)
    for (int c = 0; c < chunks; ++c) {
      const bool upper = (c >> st) & 1;
      const int q = c ^ (1 << st);
      for (int e = 0; e < roste::kE; ++e)
        t[c * roste::kE + e] = roste::lane_combine(s[c * roste::kE + e], s[q * roste::kE + e], upper);
    }
    std::swap(s, t);
  }
  for (int b = 3 + pl.shfl, r; (r = roste::pass_bits(pl, b)) != 0; b += r) {   // shared-memory passes
    const int64_t groups = n >> r;
    for (int64_t g = 0; g < groups; ++g) {
      if (r == 3) roste::radix_pass<3>(s, g, b);
      else if (r == 2) roste::radix_pass<2>(s, g, b);
      else roste::radix_pass<1>(s, g, b);
    }
  }
  if constexpr (M == 1) {
    for (int i = 0; i < n; ++i) store_bits(outr, i, a.dt, round_rne(ft_mul(s[i], scale), a.dt));
  } else {
    for (int q = 0; q < M / roste::kFactorOut; ++q) {
      for (int j = 0; j < pl.p; ++j) {
        float y[roste::kFactorOut];
        roste::factor_outputs<M, T>(s, pl.p, j, q, scale, y);
        for (int k = 0; k < roste::kFactorOut; ++k)
          store_bits(outr, int64_t(roste::kFactorOut * q + k) * pl.p + j, a.dt, round_rne(y[k], a.dt));
      }
    }
  }
}

template <int M, bool T = false>
void run(const at::Tensor& x, at::Tensor& out, const HadamardArgs& a, float scale) {
  const int64_t n = x.size(1);
  const int64_t es = x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, x.size(0), 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> s(n), t(n);
    for (int64_t r = r0; r < r1; ++r)
      transform_row<M, T>(xp + r * n * es, op + r * n * es, a, scale, s.data(), t.data());
  });
}

template <int M>
void run_factor(const at::Tensor& x, at::Tensor& out, const HadamardArgs& a, float scale) {
  if constexpr (!roste::factor_symmetric(M)) {
    if (a.transpose) return run<M, true>(x, out, a, scale);
  }
  run<M>(x, out, a, scale);
}

at::Tensor hadamard_cpu(const at::Tensor& x, double scale, at::IntArrayRef neg_masks) {
  const HadamardArgs a = hadamard_check(x, neg_masks, false);
  at::Tensor out = at::empty_like(x);
  switch (a.plan.m) {
    case 1: run<1>(x, out, a, (float)scale); break;
    case 12: run_factor<12>(x, out, a, (float)scale); break;
    case 28: run_factor<28>(x, out, a, (float)scale); break;
    case 36: run_factor<36>(x, out, a, (float)scale); break;
    case 40: run_factor<40>(x, out, a, (float)scale); break;
    case 44: run_factor<44>(x, out, a, (float)scale); break;
    default:
      TORCH_CHECK(false, "hadamard_kernel: factor order ", a.plan.m, " is not compiled (1, 12, 28, 36, 40, 44)");
  }
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("hadamard_kernel", &fusedtune::hadamard_cpu); }
