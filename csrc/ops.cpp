// Every C++ schema of fusedtune, in one TORCH_LIBRARY block. Kernels register per dispatch key in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>_dispatch.cpp.
#include <torch/library.h>

#include <string>

#ifndef FT_CUDA_ARCHS
#define FT_CUDA_ARCHS ""
#endif
#ifndef FT_TORCH_VERSION
#define FT_TORCH_VERSION ""
#endif

namespace {
std::string build_info() {
  std::string s = "{\"torch\": \"" FT_TORCH_VERSION "\", \"cuda_archs\": \"" FT_CUDA_ARCHS "\", \"with_cuda\": ";
#ifdef FT_WITH_CUDA
  s += "true, \"cuda_version\": " + std::to_string(FT_CUDA_VERSION);
#else
  s += "false, \"cuda_version\": null";
#endif
  return s + "}";
}
}  // namespace

TORCH_LIBRARY(fusedtune, m) {
  m.def("build_info() -> str", &build_info);
  // zo: t <- round(alpha * undo(t) + sum_j coeffs[j] * z(seeds[j], tensor_ids[i])); see zo_math.h.
  m.def(
      "zo_apply_kernel_(Tensor(a!)[] tensors, int[] tensor_ids, Tensor seeds, Tensor coeffs, "
      "Tensor prev_seeds, Tensor prev_coeffs, float alpha, int noise, int rounding, int rounding_seed) -> ()");
  // hft: one AdamW step over many tensors; a row master also writes its rows into targets[i].
  m.def(
      "masked_adamw_kernel_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] targets, Tensor[] rows, float[] consts) -> ()");
  // sparse_delta: AdamW on float32 deltas; weights[i].flat[indices[i]] <- round(bases[i] + delta);
  // steps[i]: empty or per-element step counts (incremented); consts: 8 AdamConsts, lr, step.
  m.def(
      "sparse_adamw_kernel_(Tensor(a!)[] values, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] weights, Tensor[] bases, Tensor[] indices, Tensor(e!)[] steps, float[] consts) -> ()");
  // sparse_delta: float32 g[p] = sum_t dy[t, r_p] * x[t, c_p] at sorted flat indices r_p * in + c_p,
  // tiled as plan = [R, C, splits, cap, span] says (sddmm_tile.h).
  m.def("sddmm_kernel(Tensor dy, Tensor x, Tensor indices, int[] plan) -> Tensor");
  // roste: out = H_m X H_p^T * scale per row (X the row as [m, p]; neg_masks: H_m's -1 entries, one
  // mask per output row; empty: m = 1); see hadamard_math.h.
  m.def("hadamard_kernel(Tensor x, float scale, int[] neg_masks) -> Tensor");
  // the same transform of 16-bit factored rows (n = m x 2^k, m > 1) with the factor on tensor cores first (CUDA
  // only; roste_mma.cu): h is the factor's matrix (H_m, or H_m^T for the backward) zero-padded to 16 ceil(m / 16)
  // square, in x's dtype
  m.def("hadamard_mma_kernel(Tensor x, float scale, Tensor h, int m) -> Tensor");
  // fp8: E4M3 with 1x128 scales (block: 128x128) of x [M, K]; copy: the column-wise copy [K, M] (block: the
  // same bytes transposed) from the same read; see fp8_math.h and fp8_checks.h.
  m.def("fp8_quant_kernel(Tensor x, bool block, bool copy, bool pow2) -> (Tensor, Tensor, Tensor, Tensor)");
}
