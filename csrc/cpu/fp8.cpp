// FP8 family, C++ CPU kernel of the 1x128 and 128x128 quantizers (rules in fp8_math.h): the CUDA kernel's
// arithmetic (the reciprocal quotient with its division fallback included) one 128x128 tile at a time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedtune/fp8_checks.h"

namespace fusedtune {
namespace {

Fp8Outputs fp8_quant_cpu(const at::Tensor& x, bool block, bool copy, bool pow2) {
  const int dt = fp8_check(x);
  TORCH_CHECK(x.device().is_cpu(), "fp8_quant_kernel: x must be a CPU tensor here");
  Fp8Outputs out = fp8_outputs(x, block, copy);
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  const int64_t MB = (M + fp8::kTile - 1) / fp8::kTile, KB = (K + fp8::kTile - 1) / fp8::kTile;
  if (M == 0 || K == 0) return out;
  const void* xp = x.data_ptr();
  uint8_t* q = static_cast<uint8_t*>(std::get<0>(out).data_ptr());
  float* s = std::get<1>(out).data_ptr<float>();
  uint8_t* qc = copy ? static_cast<uint8_t*>(std::get<2>(out).data_ptr()) : nullptr;
  float* sc = copy && !block ? std::get<3>(out).data_ptr<float>() : nullptr;
  at::parallel_for(0, MB * KB, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> v(fp8::kTile * fp8::kTile);
    float srow[fp8::kTile], scol[fp8::kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / KB, kb = t % KB, m0 = mb * fp8::kTile, k0 = kb * fp8::kTile;
      const int rows = (int)std::min<int64_t>(fp8::kTile, M - m0), cols = (int)std::min<int64_t>(fp8::kTile, K - k0);
      uint32_t rmax[fp8::kTile] = {}, cmax[fp8::kTile] = {}, all = 0;
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const float f = load_as_f32(load_bits(xp, (m0 + r) * ld + k0 + c, dt), dt);
          v[r * fp8::kTile + c] = f;
          const uint32_t mb_ = fp8::mag_bits(f);
          rmax[r] = std::max(rmax[r], mb_);
          cmax[c] = std::max(cmax[c], mb_);
          all = std::max(all, mb_);
        }
      if (block) {
        const float sb = fp8::block_scale(bits_f32(all), pow2);
        s[mb * KB + kb] = sb;
        std::fill(srow, srow + rows, sb);
      } else {
        for (int r = 0; r < rows; ++r) s[(m0 + r) * KB + kb] = srow[r] = fp8::block_scale(bits_f32(rmax[r]), pow2);
        if (copy)
          for (int c = 0; c < cols; ++c) sc[(k0 + c) * MB + mb] = scol[c] = fp8::block_scale(bits_f32(cmax[c]), pow2);
      }
      float rrow[fp8::kTile], rcol[fp8::kTile];
      for (int r = 0; r < rows; ++r) rrow[r] = fp8::quotient_rcp(srow[r]);
      if (copy && !block)
        for (int c = 0; c < cols; ++c) rcol[c] = fp8::quotient_rcp(scol[c]);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          const float f = v[r * fp8::kTile + c];
          const uint8_t b = (uint8_t)fp8::e4m3_bits(fp8::e4m3_quotient(f, srow[r], rrow[r]));
          q[(m0 + r) * K + k0 + c] = b;
          if (copy)
            qc[(k0 + c) * M + m0 + r] =
                block ? b : (uint8_t)fp8::e4m3_bits(fp8::e4m3_quotient(f, scol[c], rcol[c]));
        }
    }
  });
  return out;
}

}  // namespace
}  // namespace fusedtune

TORCH_LIBRARY_IMPL(fusedtune, CPU, m) { m.impl("fp8_quant_kernel", &fusedtune::fp8_quant_cpu); }
