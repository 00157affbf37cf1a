// Helpers of the row-wise kernels (block_ops.cpp, rms_norm.cpp): fixed-order row reductions, the fixed split of rows
// into pieces for the column sums of the backward passes (dscale, dshift, dgate, dweight), and their reduction.
//
// Column sums over rows follow common.h's rule: a piece is a fixed run of rows whose size depends on the shape only
// (never on the thread count); each piece sums its rows in order into its own fp32 slice of a workspace, and the
// pieces are added in index order in fp64. Any number of threads gives the same bits.
#pragma once

#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nftcore_native {

constexpr int64_t kRowsMinParallelElems = 1 << 15;  // below this much work, one thread (a fork costs more)
constexpr int64_t kPieceMinElems = 1 << 16;         // a piece holds at least this many elements...
constexpr int64_t kMaxPiecesPerGroup = 16;          // ...and a group of rows (a sample) at most this many pieces

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per parallel task for rows of `cols` elements.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, kRowsMinParallelElems / std::max<int64_t>(1, cols));
}

// How `rows` rows of `cols` elements split into pieces: `size` rows each (the last may be short), `count` pieces.
struct Pieces {
  int64_t size, count;
};

inline Pieces row_pieces(int64_t rows, int64_t cols) {
  const int64_t size = std::max<int64_t>({int64_t(1), ceil_div(kPieceMinElems, std::max<int64_t>(1, cols)),
                                          ceil_div(rows, kMaxPiecesPerGroup)});
  return {size, std::max<int64_t>(1, ceil_div(rows, size))};
}

// Σ x over a row, in kLanes interleaved accumulators and a fixed tree.
template <typename T>
inline float row_sum(const typename Elem<T>::storage* __restrict__ x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += Elem<T>::load(x[i + j]);
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += Elem<T>::load(x[i]);
  return lane_sum(acc);
}

// Σ (x − m)² over a row (the second pass of a two-pass variance; the row is in cache by then).
template <typename T>
inline float row_sq_dev(const typename Elem<T>::storage* __restrict__ x, int64_t n, float m) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = Elem<T>::load(x[i + j]) - m;
      acc[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = Elem<T>::load(x[i]) - m;
    acc[j] += d * d;
  }
  return lane_sum(acc);
}

// Σ a·b over fp32 rows.
inline float row_dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return lane_sum(acc);
}

// The column sums of a workspace [groups, pieces, slots, cols] for slot `slot`: a fresh [groups, cols] fp32 tensor,
// each column the pieces added in index order in fp64 (then rounded once to fp32).
inline at::Tensor reduce_pieces(const float* ws, int64_t groups, int64_t pieces, int64_t slots, int64_t slot,
                                int64_t cols, const at::TensorOptions& options) {
  at::Tensor out = at::empty({groups, cols}, options.dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  constexpr int64_t kBlock = 256;  // columns per task: an fp64 accumulator block that stays in L1
  const int64_t blocks = ceil_div(cols, kBlock);
  const int64_t grain = std::max<int64_t>(1, kRowsMinParallelElems / (kBlock * std::max<int64_t>(1, pieces)));
  at::parallel_for(0, groups * blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task / blocks, c0 = (task % blocks) * kBlock, n = std::min(kBlock, cols - c0);
      double acc[kBlock] = {};
      for (int64_t p = 0; p < pieces; ++p) {
        const float* src = ws + ((g * pieces + p) * slots + slot) * cols + c0;
        for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
      }
      for (int64_t i = 0; i < n; ++i) o[g * cols + c0 + i] = static_cast<float>(acc[i]);
    }
  });
  return out;
}

// A fresh contiguous output tensor. One of several MiB is advised onto transparent huge pages (Linux, THP in its
// default "madvise" mode): the first-touch page faults of a fresh buffer, 4 KiB at a time, cost these memory-bound
// kernels more than their arithmetic (37.7 MB: ~25 ms of faults against ~5 ms with 2 MiB pages). Advice only: no
// value changes, and where it is refused or unsupported nothing happens.
inline at::Tensor fresh_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t nbytes = t.nbytes();
  if (nbytes >= 2 * kHuge) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + nbytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // only this tensor's whole pages
  }
#endif
  return t;
}

// A fresh empty [0] tensor: what an op returns for a gradient its output mask did not ask for (never shared).
inline at::Tensor none_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

}  // namespace nftcore_native
