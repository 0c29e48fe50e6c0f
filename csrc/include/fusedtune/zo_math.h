// Zeroth-order family: counter-based noise and the per-element update rule (docs/zo_noise.md).
// Shared by the C++ CPU kernel and the CUDA kernel; the Triton kernel and the PyTorch reference
// implement the same steps in the same order, and tests hold all four to bit equality.
#pragma once
#include "fusedtune/common.h"
#include "fusedtune/zo_table.h"

namespace fusedtune {
namespace zo {

enum Noise : int32_t { NOISE_NORMAL = 0, NOISE_RADEMACHER = 1 };
enum Rounding : int32_t { ROUND_NEAREST = 0, ROUND_STOCHASTIC = 1 };
// Philox counter word 3 separates independent streams drawn from one key.
enum Stream : uint32_t { STREAM_NOISE = 0, STREAM_ROUNDING = 1 };

struct U4 {
  uint32_t x, y, z, w;
};

FT_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  uint64_t p = (uint64_t)a * (uint64_t)b;
  lo = (uint32_t)p;
  hi = (uint32_t)(p >> 32);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11), the Random123 variant.
FT_HD U4 philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  FT_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return U4{c0, c1, c2, c3};
}

// Four random words for element group g (elements 4g..4g+3) of tensor `tid` under a 64-bit seed.
FT_HD U4 draw4(uint64_t seed, uint64_t g, uint32_t tid, uint32_t stream) {
  return philox4x32_10((uint32_t)seed, (uint32_t)(seed >> 32), (uint32_t)g, (uint32_t)(g >> 32), tid, stream);
}

// One random word -> noise value. Normal: sign bit, then a 10-bit interval index and a 21-bit
// fraction into the quantile table, linear interpolation with two exactly rounded operations.
FT_HD float noise_value(uint32_t u, int noise, const float* table) {
  if (noise == NOISE_RADEMACHER) return (u >> 31) ? -1.0f : 1.0f;
  uint32_t r = u & 0x7FFFFFFFu;
  uint32_t j = r >> 21;
  float f = ft_mul((float)(r & 0x1FFFFFu), 4.76837158203125e-07f);  // * 2^-21, exact
  float a = table[j];
  float v = ft_add(a, ft_mul(ft_sub(table[j + 1], a), f));
  return (u >> 31) ? -v : v;
}

FT_HD uint32_t word(const U4& q, int k) { return k == 0 ? q.x : (k == 1 ? q.y : (k == 2 ? q.z : q.w)); }

// Stochastic rounding of an fp32 value to bf16 with 16 random bits (ties impossible; unbiased).
FT_HD uint32_t f32_to_bf16_sr(float v, uint32_t rnd16) {
  if (!f32_isfinite(v)) return f32_to_bf16_rne(v);
  return (f32_bits(v) + (rnd16 & 0xFFFFu)) >> 16;
}

// Stochastic rounding of an fp32 value to fp16 with the random word rnd. In fp16's normal range the
// low 13 bits of v's pattern are dropped after adding 13 random bits (exactly unbiased); below 2^-14
// the dropped bits are D = 13 + (-14 - e) for v's exponent e (down to 2^-24; still exact); below 2^-24
// the result is 2^-24 with probability |v| * 2^24 (24 random bits), else 0. |v| >= 65504 and
// non-finite values round to nearest (no overflow by chance). Returns fp16 bits.
FT_HD uint32_t f32_to_f16_sr(float v, uint32_t rnd) {
  const uint32_t x = f32_bits(v), sign = x & 0x80000000u, ax = x & 0x7FFFFFFFu;
  if (ax >= 0x477FE000u) return f32_to_f16_rne(v);
  if (ax < 0x33800000u) {
    const float p = ft_mul(bits_f32(ax), 16777216.0f);                  // |v| * 2^24 < 1, exact
    const float u = ft_mul((float)(rnd >> 8), 5.9604644775390625e-08f);  // 24 random bits * 2^-24, exact
    return f32_to_f16_rne(bits_f32(sign | (u < p ? 0x33800000u : 0u)));
  }
  const int e = (int)(ax >> 23) - 127;
  const uint32_t mask = (1u << (e >= -14 ? 13 : -1 - e)) - 1u;          // -1 - e == 13 + (-14 - e)
  return f32_to_f16_rne(bits_f32(sign | ((ax + (rnd & mask)) & ~mask)));  // exact: an fp16 value
}

// Undo one earlier application: the stored bits x were written as round_rne(w + dp). Returns the
// bits of w: the nearest candidate whose forward image is x, searched at w0 = round(x - dp) and
// its two neighbours, in that order (docs/zo_noise.md). Exact whenever the preimage is unique (same-binade
// moves); otherwise one of the valid preimages, at most one step of x's format away.
// w0 hits x for nearly every element (misses are ties under deltas with few significant bits), so the
// search is a branch, rarely taken (a branch-free one measured 36% slower on an H200: docs/zo_noise.md). It
// checks one neighbour: f(b) = round(b + dp) never decreases as b grows, in the order of values with -0 just
// below +0 (dp is never -0), so when f(w0) misses x only the neighbour on x's side can hit it; that returns
// what checking both in order returns.
// signed_zero_key: that order. ord_neighbour: the pattern one step below or above b in the order where both
// zeros are 0 (the search's neighbours), in 32-bit arithmetic (wrapping at the top of fp32's NaN patterns).
FT_HD int32_t signed_zero_key(uint32_t b, int dt) {
  const uint32_t sign = dt == FT_F32 ? 0x80000000u : 0x8000u, mag = b & (sign - 1u);
  return (b & sign) ? (int32_t)(0u - mag - 1u) : (int32_t)mag;
}
FT_HD uint32_t ord_neighbour(uint32_t b, int dt, bool down) {
  const uint32_t sign = dt == FT_F32 ? 0x80000000u : 0x8000u, mag = b & (sign - 1u);
  const uint32_t o = ((b & sign) ? 0u - mag : mag) + (down ? 0xFFFFFFFFu : 1u);   // ord -+ 1, mod 2^32
  return (int32_t)o >= 0 ? o : (sign | (0u - o));
}

FT_HD uint32_t invert(uint32_t x, float dp, int dt) {
  const float xv = load_as_f32(x, dt);
  if (!f32_isfinite(xv)) return x;
  const uint32_t b0 = round_rne(ft_sub(xv, dp), dt);
  const uint32_t c0 = round_rne(ft_add(load_as_f32(b0, dt), dp), dt);
  if (c0 == x) return b0;
  const uint32_t b1 = ord_neighbour(b0, dt, signed_zero_key(c0, dt) > signed_zero_key(x, dt));
  return round_rne(ft_add(load_as_f32(b1, dt), dp), dt) == x ? b1 : b0;
}

// The new value of one element: (alpha * w + delta) rounded once to the storage format.
FT_HD uint32_t finish(float w, float delta, float alpha, bool scale, int dt, int rounding, uint32_t rnd) {
  float v = ft_add(scale ? ft_mul(w, alpha) : w, delta);
  if (rounding == ROUND_STOCHASTIC && dt == FT_BF16) return f32_to_bf16_sr(v, rnd);
  if (rounding == ROUND_STOCHASTIC && dt == FT_F16) return f32_to_f16_sr(v, rnd);
  return round_rne(v, dt);
}

// Launch-independent description of one zo_apply_ call.
struct Params {
  const int64_t* seeds;        // n
  const float* coeffs;         // n
  const int64_t* prev_seeds;   // n_prev (the application to undo first), may be null if 0
  const float* prev_coeffs;    // n_prev
  int32_t n, n_prev;
  int32_t noise, rounding;
  uint64_t rounding_seed;
  float alpha;                 // multiplies the (restored) weight when scale != 0
  int32_t scale;
};

// Sum_j coeff_j * z_j for the four elements of group g, accumulated in pair order.
FT_HD void delta4(const int64_t* seeds, const float* coeffs, int n, int noise, const float* table, uint64_t g,
                  uint32_t tid, float d[4]) {
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  for (int j = 0; j < n; ++j) {
    U4 q = draw4((uint64_t)seeds[j], g, tid, STREAM_NOISE);
    float c = coeffs[j];
    d[0] = ft_add(d[0], ft_mul(c, noise_value(q.x, noise, table)));
    d[1] = ft_add(d[1], ft_mul(c, noise_value(q.y, noise, table)));
    d[2] = ft_add(d[2], ft_mul(c, noise_value(q.z, noise, table)));
    d[3] = ft_add(d[3], ft_mul(c, noise_value(q.w, noise, table)));
  }
}

// Update the elements [4g, 4g + cnt) held in bits[0..cnt) (cnt <= 4) in place.
FT_HD void update_group(const Params& p, const float* table, uint64_t g, uint32_t tid, int dt, uint32_t bits[4],
                        int cnt) {
  // (one seed undone and reapplied, MeZO's passes 2 and 3, draws once: update_group_fixed<MODE_SAME>)
  float d[4], dp[4];
  delta4(p.seeds, p.coeffs, p.n, p.noise, table, g, tid, d);
  if (p.n_prev > 0) delta4(p.prev_seeds, p.prev_coeffs, p.n_prev, p.noise, table, g, tid, dp);
  U4 r = {0, 0, 0, 0};
  if (p.rounding == ROUND_STOCHASTIC && dt != FT_F32) r = draw4(p.rounding_seed, g, tid, STREAM_ROUNDING);
  FT_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (k >= cnt) break;
    uint32_t x = p.n_prev > 0 ? invert(bits[k], dp[k], dt) : bits[k];
    bits[k] = finish(load_as_f32(x, dt), d[k], p.alpha, p.scale != 0, dt, p.rounding, word(r, k));
  }
}

// The common calls with their shape fixed at compile time, so that no per-element branch on the call's
// shape and no reload of its seeds is left: MODE_ONE, one seed and nothing to undo (a perturbation, an
// update, MeZO's first pass); MODE_SAME, one seed undone and reapplied (MeZO's passes 2 and 3); MODE_NEXT,
// one seed undone and reapplied plus a second seed (a folded MeZO's update with the next step's +eps). Each
// runs update_group's operations for such a call in the same order (same bits); the C++ CPU kernel
// runs them too, so the CPU tests hold them to the reference.
enum Mode : int32_t { MODE_GENERIC = 0, MODE_ONE = 1, MODE_SAME = 2, MODE_NEXT = 3 };

FT_HD int call_mode(const Params& p) {
  if (p.n_prev == 0) return p.n == 1 ? MODE_ONE : MODE_GENERIC;
  if (p.n_prev != 1 || p.seeds[0] != p.prev_seeds[0]) return MODE_GENERIC;
  return p.n == 1 ? MODE_SAME : p.n == 2 ? MODE_NEXT : MODE_GENERIC;
}

struct OneSeed {   // a fixed-shape call's scalars, read once (seed2, c2: MODE_NEXT's second seed)
  uint64_t seed;
  float c, pc;
  uint64_t seed2;
  float c2;
};

FT_HD OneSeed one_seed(const Params& p, int mode) {
  if (mode == MODE_GENERIC) return OneSeed{0u, 0.0f, 0.0f, 0u, 0.0f};   // (read nothing: the generic path does)
  const bool next = mode == MODE_NEXT;
  return OneSeed{(uint64_t)p.seeds[0], p.coeffs[0], mode == MODE_SAME || next ? p.prev_coeffs[0] : 0.0f,
                 next ? (uint64_t)p.seeds[1] : 0u, next ? p.coeffs[1] : 0.0f};
}

template <int MODE, int NOISE, int ROUND>
FT_HD void update_group_fixed(const Params& p, const OneSeed& o, const float* table, uint64_t g, uint32_t tid, int dt,
                              uint32_t bits[4], int cnt) {
  // MODE_NEXT: the second seed's products first, so that only they are live across the first seed's draw
  // (the sums keep delta4's order: (0 + c z) + c2 z2)
  float d2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (MODE == MODE_NEXT) {
    const U4 q2 = draw4(o.seed2, g, tid, STREAM_NOISE);
    d2[0] = ft_mul(o.c2, noise_value(q2.x, NOISE, table));
    d2[1] = ft_mul(o.c2, noise_value(q2.y, NOISE, table));
    d2[2] = ft_mul(o.c2, noise_value(q2.z, NOISE, table));
    d2[3] = ft_mul(o.c2, noise_value(q2.w, NOISE, table));
  }
  const U4 q = draw4(o.seed, g, tid, STREAM_NOISE);
  const float z[4] = {noise_value(q.x, NOISE, table), noise_value(q.y, NOISE, table), noise_value(q.z, NOISE, table),
                      noise_value(q.w, NOISE, table)};
  U4 r = {0, 0, 0, 0};
  if (ROUND == ROUND_STOCHASTIC && dt != FT_F32) r = draw4(p.rounding_seed, g, tid, STREAM_ROUNDING);
  FT_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (k >= cnt) break;
    float d = ft_add(0.0f, ft_mul(o.c, z[k]));
    if (MODE == MODE_NEXT) d = ft_add(d, d2[k]);
    const uint32_t x = MODE == MODE_SAME || MODE == MODE_NEXT ? invert(bits[k], ft_add(0.0f, ft_mul(o.pc, z[k])), dt)
                                                               : bits[k];
    bits[k] = finish(load_as_f32(x, dt), d, p.alpha, p.scale != 0, dt, ROUND, word(r, k));
  }
}

// Calls fn.template operator()<MODE, NOISE, ROUND>() for the call's fixed shape (fn is templated on them),
// or fn.template operator()<MODE_GENERIC, 0, 0>() when it has none or its mode is not among MODES (a bit
// per mode: a kernel compiles only the fixed shapes it serves). (On the GPU fn is a device functor.)
constexpr int MODES_ONE_SAME = (1 << MODE_ONE) | (1 << MODE_SAME);
constexpr int MODES_NEXT = 1 << MODE_NEXT;
constexpr int MODES_ALL = MODES_ONE_SAME | MODES_NEXT;

// fn's instantiation for fixed mode MODE and the call's noise and rounding.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <int MODE, typename Fn>
FT_HD void dispatch_shape(bool rad, bool sr, Fn&& fn) {
  if (rad) return sr ? fn.template operator()<MODE, NOISE_RADEMACHER, ROUND_STOCHASTIC>()
                     : fn.template operator()<MODE, NOISE_RADEMACHER, ROUND_NEAREST>();
  return sr ? fn.template operator()<MODE, NOISE_NORMAL, ROUND_STOCHASTIC>()
            : fn.template operator()<MODE, NOISE_NORMAL, ROUND_NEAREST>();
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <int MODES = MODES_ALL, typename Fn>
FT_HD void dispatch_mode(const Params& p, int mode, Fn&& fn) {
  const bool rad = p.noise == NOISE_RADEMACHER, sr = p.rounding == ROUND_STOCHASTIC;
  if constexpr ((MODES >> MODE_ONE) & 1) {
    if (mode == MODE_ONE) return dispatch_shape<MODE_ONE>(rad, sr, fn);
  }
  if constexpr ((MODES >> MODE_SAME) & 1) {
    if (mode == MODE_SAME) return dispatch_shape<MODE_SAME>(rad, sr, fn);
  }
  if constexpr ((MODES >> MODE_NEXT) & 1) {
    if (mode == MODE_NEXT) return dispatch_shape<MODE_NEXT>(rad, sr, fn);
  }
  return fn.template operator()<MODE_GENERIC, 0, 0>();
}

// update_group, or update_group_fixed for a call of a fixed shape.
template <int MODE, int NOISE, int ROUND>
FT_HD void update_any(const Params& p, const OneSeed& o, const float* table, uint64_t g, uint32_t tid, int dt,
                      uint32_t bits[4], int cnt) {
  if (MODE == MODE_GENERIC)
    update_group(p, table, g, tid, dt, bits, cnt);
  else
    update_group_fixed<MODE, NOISE, ROUND>(p, o, table, g, tid, dt, bits, cnt);
}

}  // namespace zo
}  // namespace fusedtune
