// Argument checks and output allocation of the FP8 quantizer kernels (host side, both dispatch keys).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "fusedtune/fp8_math.h"

namespace fusedtune {

using Fp8Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// x [M, K] with unit column stride; the storage format code (common.h's FtDtype)
inline int fp8_check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "fp8_quant_kernel: x must be 2-D [M, K], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.numel() == 0 || x.size(1) <= 1 || x.stride(1) == 1,
              "fp8_quant_kernel: x's last dimension must be contiguous");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && x.size(1) < (int64_t(1) << 31),
              "fp8_quant_kernel: each dimension must be below 2^31");
  switch (x.scalar_type()) {
    case at::kFloat: return FT_F32;
    case at::kBFloat16: return FT_BF16;
    case at::kHalf: return FT_F16;
    default: TORCH_CHECK(false, "fp8_quant_kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return FT_F32;
}

// block = false: (q [M, K], s [M, ceil(K/128)], q_col [K, M], s_col [K, ceil(M/128)]) -- the column copy
// only with copy, else empty. block = true: (q, s [ceil(M/128), ceil(K/128)], q^T [K, M] with copy, empty).
inline Fp8Outputs fp8_outputs(const at::Tensor& x, bool block, bool copy) {
  const int64_t M = x.size(0), K = x.size(1), MB = (M + fp8::kTile - 1) / fp8::kTile,
                KB = (K + fp8::kTile - 1) / fp8::kTile;
  const auto f8 = x.options().dtype(at::kFloat8_e4m3fn);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor q = at::empty({M, K}, f8);
  at::Tensor s = at::empty({block ? MB : M, KB}, f32);
  at::Tensor qc = copy ? at::empty({K, M}, f8) : at::empty({0}, f8);
  at::Tensor sc = copy && !block ? at::empty({K, MB}, f32) : at::empty({0}, f32);
  return {q, s, qc, sc};
}

}  // namespace fusedtune
