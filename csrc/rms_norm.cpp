// RMSNorm with a learned weight, optionally followed by the interleaved-pair RoPE, on CPU: the native backend of
// `nftcore.ops.rms_norm` (contract in nftcore/ops/rms_norm.py; kernels/rms_norm.py holds the Triton twin).
//
// x [..., D] is seen as rows of D: rank 4 [B, N, H, D] is read through its strides (q and k are strided views of the
// fused QKV output: no copy); other ranks are viewed (or, when they cannot be, copied) as [1, 1, rows, D].
// One pass per row, forward: rstd = 1/sqrt(Σx²/D + eps), n = x·rstd·w, (n[2i], n[2i+1]) turned by θ_i with the
// tables' fp32 row of (b, n); backward: g = grad turned by −θ_i, x̂ = x·rstd, dx = rstd·(g·w − x̂·Σ(g·x̂·w)/D) and the
// dweight sums Σ g·x̂ per fixed piece of rows, reduced in index order (rows.h): bit-identical for any thread count.
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace nftcore_native {
namespace {

// x (or a gradient) as [B, N, H, D] with a unit stride on D.
at::Tensor as_rows4(const at::Tensor& t) {
  at::Tensor x = t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
  const int64_t D = x.size(-1);
  if (x.dim() == 4) return x;
  if (x.dim() == 1) return x.view({1, 1, 1, D});
  return x.reshape({1, 1, -1, D});  // a view whenever the rows can be addressed with one stride
}

// The (cos, sin) tables as fp32 [B|1, N, D/2] with a unit last stride, addressed per (b, n) row.
struct Table {
  at::Tensor t;
  int64_t sb = 0, sn = 0;
  const float* row(int64_t b, int64_t n) const { return t.const_data_ptr<float>() + b * sb + n * sn; }
};

Table table(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t N, int64_t half) {
  TORCH_CHECK(t.device().is_cpu() && t.is_floating_point(), op, ": `", name, "` must be a float CPU tensor");
  const bool nd = t.dim() == 2 && t.size(0) == N && t.size(1) == half;
  const bool bnd = t.dim() == 3 && t.size(0) == B && t.size(1) == N && t.size(2) == half;
  TORCH_CHECK(nd || bnd, op, ": `", name, "` must be [N, D/2] or [B, N, D/2] = [", B, ", ", N, ", ", half, "], got ",
              t.sizes());
  at::Tensor f = t.to(at::kFloat);
  if (half > 1 && f.stride(-1) != 1) f = f.contiguous();
  Table tab{f};
  tab.sn = f.stride(-2);
  tab.sb = bnd ? f.stride(0) : 0;
  return tab;
}

struct Rope {
  bool on = false;
  Table cos, sin;
};

Rope rope_of(const char* op, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
             const at::Tensor& x4, int64_t rank) {
  Rope rope;
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin come together");
  if (!cos) return rope;
  const int64_t D = x4.size(3);
  TORCH_CHECK(rank == 4 && D % 2 == 0, op, ": RoPE needs x [B, N, H, D] with an even D");
  rope.on = true;
  rope.cos = table(op, "cos", *cos, x4.size(0), x4.size(1), D / 2);
  rope.sin = table(op, "sin", *sin, x4.size(0), x4.size(1), D / 2);
  return rope;
}

// ------------------------------------------------------------------------------------------------ row kernels

template <typename T>
inline float row_rstd(const typename Elem<T>::storage* x, int64_t D, float eps) {
  return 1.0f / std::sqrt(row_sq_dev<T>(x, D, 0.0f) / static_cast<float>(D) + eps);  // (x − 0)² = x², exactly
}

template <typename T>
inline void norm_row(const typename Elem<T>::storage* __restrict__ x, const float* __restrict__ w, float r,
              typename Elem<T>::storage* __restrict__ y, int64_t D) {
  using E = Elem<T>;
  for (int64_t i = 0; i < D; ++i) y[i] = E::store(E::load(x[i]) * r * w[i]);
}

// n = x·rstd·w, then the pairs turned by θ: (n₀·c − n₁·s, n₀·s + n₁·c), the complex product n·(c + i·s).
template <typename T>
inline void norm_rope_row(const typename Elem<T>::storage* __restrict__ x, const float* __restrict__ w, float r,
                   const float* __restrict__ c, const float* __restrict__ s, typename Elem<T>::storage* __restrict__ y,
                   int64_t half) {
  using E = Elem<T>;
  for (int64_t k = 0; k < half; ++k) {
    const float n0 = E::load(x[2 * k]) * r * w[2 * k], n1 = E::load(x[2 * k + 1]) * r * w[2 * k + 1];
    y[2 * k] = E::store(n0 * c[k] - n1 * s[k]);
    y[2 * k + 1] = E::store(n0 * s[k] + n1 * c[k]);
  }
}

// g = grad turned by −θ: the complex product grad·(c − i·s) = (g₀·c + g₁·s, g₁·c − g₀·s).
template <typename T>
inline void unrotate_row(const typename Elem<T>::storage* __restrict__ grad, const float* __restrict__ c,
                  const float* __restrict__ s, float* __restrict__ g, int64_t half) {
  using E = Elem<T>;
  for (int64_t k = 0; k < half; ++k) {
    const float g0 = E::load(grad[2 * k]), g1 = E::load(grad[2 * k + 1]);
    g[2 * k] = g0 * c[k] + g1 * s[k];
    g[2 * k + 1] = g1 * c[k] - g0 * s[k];
  }
}

template <typename T>
inline void load_row(const typename Elem<T>::storage* __restrict__ src, float* __restrict__ dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = Elem<T>::load(src[i]);
}

// x̂ = x·rstd (kept), returns Σ g·x̂·w; with kDW also dw += g·x̂ (the piece's column sums).
template <typename T, bool kDW>
inline float dot_row(const typename Elem<T>::storage* __restrict__ x, const float* __restrict__ g, const float* __restrict__ w,
              float r, float* __restrict__ xh, float* __restrict__ dw, int64_t D) {
  float acc[kLanes] = {};
  auto step = [&](int64_t i, int j) {
    const float v = Elem<T>::load(x[i]) * r;
    xh[i] = v;
    const float gx = g[i] * v;
    acc[j] += gx * w[i];
    if (kDW) dw[i] += gx;
  };
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  }
  for (int j = 0; i < D; ++i, ++j) step(i, j);
  return lane_sum(acc);
}

template <typename T>
inline void dx_row(const float* __restrict__ g, const float* __restrict__ w, const float* __restrict__ xh, float c2, float r,
            typename Elem<T>::storage* __restrict__ dx, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dx[i] = Elem<T>::store((g[i] * w[i] - xh[i] * c2) * r);
}

// ------------------------------------------------------------------------------------------------ the ops

// Rows of a [B, N, H, D] view as raw pointers and strides, and a (b, n, h) cursor over them: the row loops below
// take a range of rows and read nothing through at::Tensor inside it (an accessor call per row of D = 32-128
// elements cost more than the row's arithmetic).
template <typename S>
struct RowPtrs {
  S* base;
  int64_t sb, sn, sh;
  S* at(int64_t b, int64_t n, int64_t h) const { return base + b * sb + n * sn + h * sh; }
};

template <typename S>
RowPtrs<S> row_ptrs(const at::Tensor& t) {
  return {reinterpret_cast<S*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

struct RopePtrs {
  const float *cos = nullptr, *sin = nullptr;
  int64_t cb = 0, cn = 0, sb = 0, sn = 0;
};

RopePtrs rope_ptrs(const Rope& rope) {
  if (!rope.on) return {};
  return {rope.cos.t.const_data_ptr<float>(), rope.sin.t.const_data_ptr<float>(), rope.cos.sb, rope.cos.sn,
          rope.sin.sb, rope.sin.sn};
}

struct Cursor {
  int64_t b, n, h;
  const int64_t N, H;
  Cursor(int64_t r, int64_t N_, int64_t H_) : b(r / (H_ * N_)), n((r / H_) % N_), h(r % H_), N(N_), H(H_) {}
  void next() {
    if (++h == H) {
      h = 0;
      if (++n == N) n = 0, ++b;
    }
  }
};

template <typename T>
NFTCORE_CLONES void forward_rows(RowPtrs<const typename Elem<T>::storage> x, const float* __restrict__ w,
                                 RopePtrs rope, float eps, typename Elem<T>::storage* __restrict__ y,
                                 float* __restrict__ rstd, int64_t N, int64_t H, int64_t D, int64_t lo, int64_t hi) {
  Cursor c(lo, N, H);
  for (int64_t r = lo; r < hi; ++r, c.next()) {
    const auto* xr = x.at(c.b, c.n, c.h);
    const float rs = row_rstd<T>(xr, D, eps);
    rstd[r] = rs;
    if (rope.cos) {
      norm_rope_row<T>(xr, w, rs, rope.cos + c.b * rope.cb + c.n * rope.cn, rope.sin + c.b * rope.sb + c.n * rope.sn,
                       y + r * D, D / 2);
    } else {
      norm_row<T>(xr, w, rs, y + r * D, D);
    }
  }
}

template <typename T>
void forward_kernel(const at::Tensor& x, const float* w, const Rope& rope, float eps, const at::Tensor& y,
                    float* rstd) {
  using S = typename Elem<T>::storage;
  const int64_t N = x.size(1), H = x.size(2), D = x.size(3), R = x.size(0) * N * H;
  const RowPtrs<const S> xp = row_ptrs<const S>(x);
  const RopePtrs rp = rope_ptrs(rope);
  S* out = mdata<T>(y);
  at::parallel_for(0, R, row_grain(D), [&](int64_t lo, int64_t hi) {
    forward_rows<T>(xp, w, rp, eps, out, rstd, N, H, D, lo, hi);
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& cos,
                                                    const std::optional<at::Tensor>& sin, double eps) {
  const char* op = "nftcore_native::rms_norm_forward";
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1, op, ": x must be a CPU tensor [..., D]");
  TORCH_CHECK(is_native_float(x_in.scalar_type()), op, ": native kernels take float32, bfloat16 or float16, got ",
              x_in.scalar_type());
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 1 && weight.size(0) == D && weight.is_floating_point(), op,
              ": weight must be a float CPU [D] = [", D, "] tensor, got ", weight.sizes());
  const at::Tensor x = as_rows4(x_in), w = weight.to(at::kFloat).contiguous();
  const Rope rope = rope_of(op, cos, sin, x, x_in.dim());
  at::Tensor y = fresh_output(x_in.sizes(), x_in.options());
  const auto stat_shape = x_in.sizes().slice(0, x_in.dim() - 1);
  at::Tensor rstd = at::empty(stat_shape, x_in.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, rstd.zero_()};
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    forward_kernel<typename decltype(tag)::type>(x, w.const_data_ptr<float>(), rope, static_cast<float>(eps), y,
                                                 rstd.mutable_data_ptr<float>());
  });
  return {y, rstd};
}

// Rows [lo, hi) of the backward: dx (when dx is given) and, with kDW, Σ g·x̂ added into dw [D].
template <typename T, bool kDW>
NFTCORE_CLONES void backward_rows(RowPtrs<const typename Elem<T>::storage> grad,
                                  RowPtrs<const typename Elem<T>::storage> x, const float* __restrict__ w,
                                  const float* __restrict__ rstd, RopePtrs rope, typename Elem<T>::storage* dx,
                                  float* __restrict__ dw, float* __restrict__ g, float* __restrict__ xh, int64_t N,
                                  int64_t H, int64_t D, int64_t lo, int64_t hi) {
  Cursor c(lo, N, H);
  for (int64_t r = lo; r < hi; ++r, c.next()) {
    const auto* gr = grad.at(c.b, c.n, c.h);
    if (rope.cos) {
      unrotate_row<T>(gr, rope.cos + c.b * rope.cb + c.n * rope.cn, rope.sin + c.b * rope.sb + c.n * rope.sn, g,
                      D / 2);
    } else {
      load_row<T>(gr, g, D);
    }
    const float dot = dot_row<T, kDW>(x.at(c.b, c.n, c.h), g, w, rstd[r], xh, dw, D);
    if (dx) dx_row<T>(g, w, xh, dot / static_cast<float>(D), rstd[r], dx + r * D, D);
  }
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& x, const float* w, const float* rstd, const Rope& rope,
                     const at::Tensor* dx, float* ws, const Pieces& pieces) {
  using S = typename Elem<T>::storage;
  const int64_t N = x.size(1), H = x.size(2), D = x.size(3), R = x.size(0) * N * H;
  const RowPtrs<const S> gp = row_ptrs<const S>(grad), xp = row_ptrs<const S>(x);
  const RopePtrs rp = rope_ptrs(rope);
  S* dxp = dx ? mdata<T>(*dx) : nullptr;
  at::parallel_for(0, pieces.count, std::max<int64_t>(1, row_grain(D) / pieces.size), [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(2 * D);
    float *g = scratch.data(), *xh = g + D;
    for (int64_t p = lo; p < hi; ++p) {
      float* dw = ws ? ws + p * D : nullptr;
      if (dw) std::fill(dw, dw + D, 0.0f);
      const int64_t begin = p * pieces.size, end = std::min(R, begin + pieces.size);
      if (dw) {
        backward_rows<T, true>(gp, xp, w, rstd, rp, dxp, dw, g, xh, N, H, D, begin, end);
      } else {
        backward_rows<T, false>(gp, xp, w, rstd, rp, dxp, nullptr, g, xh, N, H, D, begin, end);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& cos,
                                                     const std::optional<at::Tensor>& sin, std::array<bool, 2> mask) {
  const char* op = "nftcore_native::rms_norm_backward";
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1, op, ": x must be a CPU tensor [..., D]");
  TORCH_CHECK(is_native_float(x_in.scalar_type()), op, ": native kernels take float32, bfloat16 or float16, got ",
              x_in.scalar_type());
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device().is_cpu(),
              op, ": grad must have x's shape and dtype");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_floating_point(), op, ": weight must be [D]");
  const at::Tensor x = as_rows4(x_in), grad = as_rows4(grad_in), w = weight.to(at::kFloat).contiguous();
  const int64_t R = x.size(0) * x.size(1) * x.size(2);
  TORCH_CHECK(rstd.numel() == R, op, ": rstd must have one value per row (", R, "), got ", rstd.sizes());
  const at::Tensor rstd32 = rstd.to(at::kFloat).contiguous();
  const Rope rope = rope_of(op, cos, sin, x, x_in.dim());
  const bool want_dx = mask[0], want_dw = mask[1];
  at::Tensor dx = want_dx ? fresh_output(x_in.sizes(), x_in.options()) : none_like(x_in);
  const Pieces pieces = row_pieces(R, D);
  at::Tensor ws = at::empty({want_dw ? pieces.count * D : 0}, x.options().dtype(at::kFloat));
  if (want_dx || want_dw) {
    dispatch_float(x.scalar_type(), op, [&](auto tag) {
      backward_kernel<typename decltype(tag)::type>(grad, x, w.const_data_ptr<float>(),
                                                    rstd32.const_data_ptr<float>(), rope, want_dx ? &dx : nullptr,
                                                    want_dw ? ws.mutable_data_ptr<float>() : nullptr, pieces);
    });
  }
  at::Tensor dw = want_dw ? reduce_pieces(ws.const_data_ptr<float>(), 1, pieces.count, 1, 0, D, x.options())
                                .view({D})
                                .to(weight.scalar_type())
                          : none_like(x_in);
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nftcore_native, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, Tensor? cos, Tensor? sin, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nftcore_native, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace nftcore_native
