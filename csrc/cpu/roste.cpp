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

template <int M>
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
  if (M == 1) {
    for (int i = 0; i < n; ++i) store_bits(outr, i, a.dt, round_rne(ft_mul(s[i], scale), a.dt));
  } else {
    for (int j = 0; j < pl.p; ++j) roste::factor_column<M>(s, pl.p, j, a.neg, scale, outr, a.dt);
  }
}

template <int M>
void run(const at::Tensor& x, at::Tensor& out, const HadamardArgs& a, float scale) {
  const int64_t n = x.size(1);
  const int64_t es = x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, x.size(0), 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> s(n), t(n);
    for (int64_t r = r0; r < r1; ++r) transform_row<M>(xp + r * n * es, op + r * n * es, a, scale, s.data(), t.data());
  });
}

at::Tensor hadamard_cpu(const at::Tensor& x, double scale, at::IntArrayRef neg_masks) {
  const HadamardArgs a = hadamard_check(x, neg_masks, false);
  at::Tensor out = at::empty_like(x);
  switch (a.plan.m) {
    case 1: run<1>(x, out, a, (float)scale); break;
    case 12: run<12>(x, out, a, (float)scale); break;
    case 20: run<20>(x, out, a, (float)scale); break;
    case 28: run<28>(x, out, a, (float)scale); break;
    case 36: run<36>(x, out, a, (float)scale); break;
    case 40: run<40>(x, out, a, (float)scale); break;
    case 44: run<44>(x, out, a, (float)scale); break;
    default:
      TORCH_CHECK(false, "hadamard_kernel: factor order ", a.plan.m, " is not compiled (1, 12, 20, 28, 36, 40, 44)");
  }
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("hadamard_kernel", &fusedtune::hadamard_cpu); }
