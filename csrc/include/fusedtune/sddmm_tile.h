// Sparse-delta family: the tiled SDDMM g[p] = sum_t dy[t, r_p] * x[t, c_p] at k sorted flat row-major
// indices p -> (r_p, c_p), one schedule shared by the CUDA kernel and its CPU twin.
//
// Why tiles: at 1% density each column of x serves ~1% of the rows. Streaming a column of x per
// index (the Triton kernel) moves 2 * T * k bytes through L2. A tile of R rows x C columns instead
// stages dy[t0:t0+16, r0:r0+R] and x[t0:t0+16, c0:c0+C] in shared memory once per 16 tokens, and
// the ~R*C*density indices inside the tile (its "items") read both from there: (R + C) elements
// per token per tile. Items and their fp32 accumulators live in shared memory; when more items fall
// in a tile than fit (`cap`), the tile runs in batches, each streaming its tokens again. Tokens are
// cut into `splits` ranges; split s writes its partial sums to row s of a [splits, k] buffer, and
// the rows are added in split order afterwards, so the result does not depend on timing, and the
// CPU twin reproduces the CUDA kernel bit for bit for the same plan.
//
// One (tile, split) runs these phases; each phase runs for every thread id 0..kThreads-1 (CUDA:
// in parallel, CPU: in turn), with a barrier between phases:
//   count      each thread owns a run of rows, finds each row's indices inside the tile's columns
//              (binary search in the row's CSR range) and scans their counts along its run
//   scan       Hillis-Steele over the kThreads run totals (kLogThreads steps, double buffered)
//   offsets    adds the run's exclusive prefix to its rows' offsets
//   per batch: fill (items, zeroed accumulators); per 16-token chunk: stage (the x and dy chunks,
//              transposed: one 16-token row per column) and dot (a run of items per thread, one
//              fmaf chain of 16 per item added to its accumulator); then write (accumulators to
//              the split's partial row).
#pragma once
#include <math.h>

#include "fusedtune/common.h"

namespace fusedtune {
namespace sddmm {

constexpr int kTc = 16;          // tokens staged per chunk
constexpr int kThreads = 256;    // threads per tile (the CPU twin walks the same thread ids)
constexpr int kLogThreads = 8;
constexpr int kMaxTile = 1 << 16;  // tile rows and columns fit the 16-bit halves of an item

struct Problem {
  const void* dy;          // [T, N] row-major, dtype dt
  const void* x;           // [T, K] row-major, dtype dt
  const int32_t* idx;      // [k] sorted, unique, < N * K
  const int32_t* row_ptr;  // [N + 1]: row r's indices are idx[row_ptr[r] .. row_ptr[r + 1])
  float* partial;          // [splits, k]
  int64_t T, N, K, k;
};

struct Plan {
  int32_t R, C;     // tile rows (output features) and columns (input features)
  int32_t splits;   // token ranges [s * span, min(T, (s + 1) * span))
  int32_t cap;      // items a tile holds at once
  int64_t span;     // a multiple of kTc
};

// Byte offsets of a tile's shared arrays; `total` is the shared memory one tile needs.
struct Layout {
  size_t xs, dys, row_first, row_off, scan, item, acc, total;
};

FT_HD Layout layout(const Plan& p, int es) {
  Layout l;
  l.xs = 0;
  l.dys = l.xs + (size_t)p.C * kTc * es;
  l.row_first = l.dys + (size_t)p.R * kTc * es;
  l.row_off = l.row_first + (size_t)p.R * 4;
  l.scan = l.row_off + (size_t)(p.R + 1) * 4;
  l.item = l.scan + (size_t)2 * kThreads * 4;
  l.acc = l.item + (size_t)p.cap * 4;
  l.total = l.acc + (size_t)p.cap * 4;
  return l;
}

struct Tile {
  unsigned char* xs;    // [C][kTc] elements: x's chunk, column c's 16 tokens contiguous
  unsigned char* dys;   // [R][kTc]
  int32_t* row_first;   // [R] position in idx of the row's first item
  int32_t* row_off;     // [R + 1] exclusive scan of the rows' item counts
  int32_t* scan;        // [2][kThreads]
  uint32_t* item;       // [cap] (row << 16) | column, local to the tile
  float* acc;           // [cap]
  int64_t r0, c0, t_beg, t_end;
  int32_t rows, cols, split;
};

FT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FT_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

FT_HD Tile make_tile(const Problem& P, const Plan& p, int64_t col_tile, int64_t row_tile, int32_t split,
                     unsigned char* smem, int es) {
  const Layout l = layout(p, es);
  Tile t;
  t.xs = smem + l.xs;
  t.dys = smem + l.dys;
  t.row_first = reinterpret_cast<int32_t*>(smem + l.row_first);
  t.row_off = reinterpret_cast<int32_t*>(smem + l.row_off);
  t.scan = reinterpret_cast<int32_t*>(smem + l.scan);
  t.item = reinterpret_cast<uint32_t*>(smem + l.item);
  t.acc = reinterpret_cast<float*>(smem + l.acc);
  t.r0 = row_tile * p.R;
  t.c0 = col_tile * p.C;
  t.rows = (int32_t)min64(p.R, P.N - t.r0);
  t.cols = (int32_t)min64(p.C, P.K - t.c0);
  t.split = split;
  t.t_beg = min64(P.T, split * p.span);
  t.t_end = min64(P.T, t.t_beg + p.span);
  return t;
}

// First position in [lo, hi) whose index is >= key (hi if none).
FT_HD int32_t lower_bound(const int32_t* a, int32_t lo, int32_t hi, int64_t key) {
  while (lo < hi) {
    const int32_t mid = lo + ((hi - lo) >> 1);
    if ((int64_t)a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// CSR row pointers of the sorted indices, one entry e in [0, k] at a time: rows after idx[e-1]'s row
// up to idx[e]'s row start at e (e == k: every row after the last index's).
FT_HD void csr_entry(const int32_t* idx, int64_t k, int64_t K, int64_t N, int64_t e, int32_t* row_ptr) {
  const int64_t prev = e == 0 ? -1 : idx[e - 1] / K;
  const int64_t cur = e == k ? N : idx[e] / K;
  for (int64_t r = max64(prev + 1, 0); r <= cur && r <= N; ++r) row_ptr[r] = (int32_t)e;
}

FT_HD void run_of(const Tile& t, int tid, int32_t& rb, int32_t& re) {
  const int32_t per = (t.rows + kThreads - 1) / kThreads;
  rb = (int32_t)min64((int64_t)tid * per, t.rows);
  re = (int32_t)min64((int64_t)rb + per, t.rows);
}

FT_HD void phase_count(const Problem& P, const Tile& t, int tid) {
  int32_t rb, re;
  run_of(t, tid, rb, re);
  int32_t run = 0;
  for (int32_t r = rb; r < re; ++r) {
    const int64_t row = t.r0 + r;
    const int64_t key = row * P.K + t.c0;
    // clamped: row pointers of unchecked (unsorted) indices can never send a search out of idx
    const int32_t a = (int32_t)min64(max64(P.row_ptr[row], 0), P.k);
    const int32_t b = (int32_t)min64(max64(P.row_ptr[row + 1], a), P.k);
    const int32_t lo = lower_bound(P.idx, a, b, key);
    const int32_t hi = lower_bound(P.idx, lo, b, key + t.cols);
    t.row_first[r] = lo;
    run += hi - lo;
    t.row_off[r + 1] = run;
  }
  t.scan[tid] = run;
  if (tid == 0) t.row_off[0] = 0;
}

FT_HD void phase_scan(const Tile& t, int step, int tid) {
  const int32_t* src = t.scan + (step & 1) * kThreads;
  int32_t* dst = t.scan + ((step + 1) & 1) * kThreads;
  const int off = 1 << step;
  dst[tid] = src[tid] + (tid >= off ? src[tid - off] : 0);
}

// After kLogThreads (even) scan steps the inclusive scan is in buffer 0; the tile's item count is
// its last entry.
FT_HD int32_t tile_items(const Tile& t) { return t.scan[kThreads - 1]; }

FT_HD void phase_offsets(const Tile& t, int tid) {
  int32_t rb, re;
  run_of(t, tid, rb, re);
  const int32_t prefix = tid > 0 ? t.scan[tid - 1] : 0;
  for (int32_t r = rb; r < re; ++r) t.row_off[r + 1] += prefix;
}

// Items b0 .. b0 + nb - 1 of the tile (in row-major order) into item[0 .. nb), accumulators zeroed.
FT_HD void phase_fill(const Problem& P, const Tile& t, int32_t b0, int32_t nb, int tid) {
  int32_t rb, re;
  run_of(t, tid, rb, re);
  for (int32_t r = rb; r < re; ++r) {
    const int32_t beg = t.row_off[r], end = t.row_off[r + 1];
    const int32_t lo = (int32_t)max64(beg, b0), hi = (int32_t)min64(end, (int64_t)b0 + nb);
    const int64_t base = (t.r0 + r) * P.K + t.c0;
    for (int32_t j = lo; j < hi; ++j) {
      int64_t col = (int64_t)P.idx[t.row_first[r] + (j - beg)] - base;
      if (col < 0 || col >= t.cols) col = 0;  // only unchecked, unsorted indices get here
      t.item[j - b0] = ((uint32_t)r << 16) | (uint32_t)col;
      t.acc[j - b0] = 0.0f;
    }
  }
}

// Element bits of a dtype (FT_F32 / FT_BF16 / FT_F16) as a float.
template <int DT>
FT_HD float to_f32(uint32_t b) {
  return DT == FT_F32 ? bits_f32(b) : (DT == FT_BF16 ? bf16_to_f32(b) : f16_to_f32(b));
}

// A staged row is kTc elements, 32 (16-bit) or 64 (fp32) bytes: 2 or 4 16-byte chunks. Chunk i of row
// `line` sits in slot i ^ swizzle(line), so that 16-byte loads of random rows spread over all eight
// 4-bank groups (unswizzled, chunk i of a 16-bit row could only reach 4 of them, of an fp32 row 2).
template <int DT>
FT_HD int chunk_slot(int i, int64_t line) {
  constexpr int kVec = DT == FT_F32 ? 4 : 2;
  return i ^ (int)((line >> (DT == FT_F32 ? 1 : 2)) & (kVec - 1));
}

// Row `line` of a staged array: kTc elements of src's column `col` (tokens t0 .. t0 + kTc - 1, zeros
// past t_end).
template <int DT>
FT_HD void stage_row(const void* src, int64_t ld, int64_t col, int64_t t0, int64_t t_end, unsigned char* base,
                     int64_t line) {
  constexpr int kWords = DT == FT_F32 ? kTc : kTc / 2;
  unsigned char* dst = base + line * kWords * 4;
  uint32_t w[kWords];
  FT_UNROLL
  for (int i = 0; i < kWords; ++i) w[i] = 0;
  FT_UNROLL
  for (int tt = 0; tt < kTc; ++tt) {
    const int64_t tok = t0 + tt;
    const uint32_t b = tok < t_end ? load_bits(src, tok * ld + col, DT) : 0u;
    if (DT == FT_F32) w[tt] = b;
    else w[tt >> 1] |= b << ((tt & 1) * 16);
  }
  FT_UNROLL
  for (int i = 0; i < kWords / 4; ++i) {
#if defined(__CUDA_ARCH__)
    reinterpret_cast<uint4*>(dst)[chunk_slot<DT>(i, line)] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
#else
    memcpy(dst + 16 * chunk_slot<DT>(i, line), &w[4 * i], 16);
#endif
  }
}

// Staging: a thread's rows one after another, two in flight (each row is kTc scalar global loads).
template <int DT>
FT_HD void phase_stage(const Problem& P, const Tile& t, int64_t t0, int tid) {
  FT_UNROLL2
  for (int32_t c = tid; c < t.cols; c += kThreads) stage_row<DT>(P.x, P.K, t.c0 + c, t0, t.t_end, t.xs, c);
  FT_UNROLL2
  for (int32_t r = tid; r < t.rows; r += kThreads) stage_row<DT>(P.dy, P.N, t.r0 + r, t0, t.t_end, t.dys, r);
}

// Row `line` of a staged array as kTc floats.
template <int DT>
FT_HD void load_row(const unsigned char* base, int64_t line, float* v) {
  constexpr int kWords = DT == FT_F32 ? kTc : kTc / 2;
  const unsigned char* p = base + line * kWords * 4;
  uint32_t w[kWords];
  FT_UNROLL
  for (int i = 0; i < kWords / 4; ++i) {
#if defined(__CUDA_ARCH__)
    const uint4 q = reinterpret_cast<const uint4*>(p)[chunk_slot<DT>(i, line)];
    w[4 * i] = q.x;
    w[4 * i + 1] = q.y;
    w[4 * i + 2] = q.z;
    w[4 * i + 3] = q.w;
#else
    memcpy(&w[4 * i], p + 16 * chunk_slot<DT>(i, line), 16);
#endif
  }
  FT_UNROLL
  for (int tt = 0; tt < kTc; ++tt)
    v[tt] = DT == FT_F32 ? bits_f32(w[tt]) : to_f32<DT>((w[tt >> 1] >> ((tt & 1) * 16)) & 0xFFFFu);
}

// Items per thread in phase_dot: contiguous runs, an odd count so that the 32 lanes of a warp,
// reading item[m] and acc[m] at that stride, hit 32 different banks.
FT_HD int32_t dot_run(int32_t nb) { return ((nb + kThreads - 1) / kThreads) | 1; }

// acc[m] += fmaf chain over the chunk's 16 tokens, t = 0 .. 15 in order (fmaf: fused on both sides).
// A thread's run of items is row-major, so its dy row stays in registers until the row changes.
template <int DT>
FT_HD void phase_dot(const Tile& t, int32_t nb, int tid) {
  const int32_t run = dot_run(nb);
  const int32_t mb = (int32_t)min64((int64_t)tid * run, nb), me = (int32_t)min64((int64_t)mb + run, nb);
  float a[kTc], b[kTc];
  uint32_t row = 0xFFFFFFFFu;
  for (int32_t m = mb; m < me; ++m) {
    const uint32_t it = t.item[m];
    if ((it >> 16) != row) {
      row = it >> 16;
      load_row<DT>(t.dys, row, a);
    }
    load_row<DT>(t.xs, it & 0xFFFFu, b);
    float s = 0.0f;
    FT_UNROLL
    for (int tt = 0; tt < kTc; ++tt) s = fmaf(a[tt], b[tt], s);
    t.acc[m] = ft_add(t.acc[m], s);
  }
}

FT_HD void phase_write(const Problem& P, const Tile& t, int32_t b0, int32_t nb, int tid) {
  float* out = P.partial + (int64_t)t.split * P.k;
  for (int32_t m = tid; m < nb; m += kThreads) {
    const int32_t r = (int32_t)(t.item[m] >> 16);
    out[t.row_first[r] + (b0 + m - t.row_off[r])] = t.acc[m];
  }
}

// The result at position p: the splits' partial sums added in split order.
FT_HD float reduce_entry(const float* partial, int64_t k, int32_t splits, int64_t p) {
  float s = partial[p];
  for (int32_t i = 1; i < splits; ++i) s = ft_add(s, partial[(int64_t)i * k + p]);
  return s;
}

}  // namespace sddmm
}  // namespace fusedtune
