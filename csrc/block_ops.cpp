// AdaLN modulation and gated residuals of an MMDiT block on CPU: the native backend of `nftcore.ops.adaln`,
// `gated_adaln` and `gated_residual` (contract and signatures in nftcore/ops/adaln.py; kernels/adaln.py holds the
// Triton twins this mirrors formula for formula).
//
// x, y [B, N, C] are read through their batch/token strides (q-style slices of the joint stream need no copy; a
// non-unit stride on C, e.g. a stride-0 gradient of `.sum()`, is copied first). scale/shift/gate [B, C] of any float
// dtype and layout are widened once to contiguous fp32 (B·C values). Every row is one task's, in one pass over
// memory: the row stays in L1/L2 between the statistics and the output loop.
//
// - adaln / gated_adaln forward: [h = round(x + gate·y), written]; mean, two-pass variance (fp32, fixed lane order);
//   out = (h − mean)·rstd·(1 + scale) + shift.
// - backward: x̂ from the saved mean/rstd (h recomputed, rounded as in the forward); dh = rstd·(g·w − mean(g·w) −
//   x̂·mean(g·w·x̂)) (+ grad_h), kept in fp32 until stored; dx = dh, dy = gate·dh; the [B, C] sums Σ g·x̂, Σ g, Σ dh·y
//   per piece of rows into a workspace reduced in index order (rows.h): bit-identical for any thread count.
// - gated_residual: out = x + gate·y; backward dy = gate·grad and the pieces of Σ grad·y.
// Big outputs come from `fresh_output` (rows.h: huge-page advice); the row loops are `NFTCORE_CLONES` (common.h).
#include "rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace nftcore_native {
namespace {

enum Slot { kDScale = 0, kDShift, kDGate, kSlots };

// ------------------------------------------------------------------------------------------------ input checks

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": native kernels take CPU tensors");
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, C], got ", x.sizes());
  TORCH_CHECK(is_native_float(x.scalar_type()), op, ": native kernels take float32, bfloat16 or float16, got ",
              x.scalar_type());
}

// A [B, N, C] companion of x (y, a gradient): x's shape and dtype, read with a unit stride on C.
at::Tensor stream(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.sizes() == x.sizes(), op, ": `", name, "` must be a CPU tensor of x's shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": `", name, "` must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous();
}

at::Tensor unit_c(const at::Tensor& x) { return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous(); }

// A [B, C] modulation vector as contiguous fp32.
at::Tensor vec32(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(2), op, ": `",
              name, "` must be a CPU [B, C] = [", x.size(0), ", ", x.size(2), "] tensor, got ", v.sizes());
  TORCH_CHECK(v.is_floating_point(), op, ": `", name, "` must be a float tensor, got ", v.scalar_type());
  return v.to(at::kFloat).contiguous();
}

// The saved [B, N] statistics as contiguous fp32.
at::Tensor stat32(const char* op, const char* name, const at::Tensor& s, const at::Tensor& x) {
  TORCH_CHECK(s.device().is_cpu() && s.numel() == x.size(0) * x.size(1), op, ": `", name, "` must have B·N = ",
              x.size(0) * x.size(1), " elements, got ", s.sizes());
  return s.to(at::kFloat).contiguous();
}

// A [B, N, C] tensor's rows as a raw pointer and batch/token strides: the cloned row-range loops below read nothing
// through at::Tensor (an accessor call per row of C = 64-3072 elements is a visible cost at the small widths).
template <typename S>
struct Rows3 {
  S* base = nullptr;
  int64_t sb = 0, sn = 0;
  S* at(int64_t b, int64_t n) const { return base + b * sb + n * sn; }
};

template <typename T>
Rows3<const typename Elem<T>::storage> rows3(const at::Tensor* t) {
  if (t == nullptr) return {};
  return {cdata<T>(*t), t->stride(0), t->stride(1)};
}

// ------------------------------------------------------------------------------------------------ row kernels

// out = round(x + gate·y).
template <typename T>
inline void residual_row(const typename Elem<T>::storage* __restrict__ x, const float* __restrict__ gate,
                  const typename Elem<T>::storage* __restrict__ y, typename Elem<T>::storage* __restrict__ out,
                  int64_t C) {
  using E = Elem<T>;
  for (int64_t i = 0; i < C; ++i) out[i] = E::store(E::load(x[i]) + gate[i] * E::load(y[i]));
}

// out = (src − mean)·rstd·w + shift with the row's own mean and rstd (returned through `stats`).
template <typename T>
inline void adaln_row(const typename Elem<T>::storage* __restrict__ src, const float* __restrict__ w,
               const float* __restrict__ shift, typename Elem<T>::storage* __restrict__ out, int64_t C, float eps,
               float* stats) {
  using E = Elem<T>;
  const float c = static_cast<float>(C);
  const float m = row_sum<T>(src, C) / c;
  const float r = 1.0f / std::sqrt(row_sq_dev<T>(src, C, m) / c + eps);
  for (int64_t i = 0; i < C; ++i) out[i] = E::store((E::load(src[i]) - m) * r * w[i] + shift[i]);
  stats[0] = m;
  stats[1] = r;
}

// x̂ = (x − mean)·rstd into fp32, x being h = round(x + gate·y) when kGated (exactly the forward's h).
template <typename T, bool kGated>
inline void xhat_row(const typename Elem<T>::storage* __restrict__ x, const float* __restrict__ gate,
              const typename Elem<T>::storage* __restrict__ y, float m, float r, float* __restrict__ xh, int64_t C) {
  using E = Elem<T>;
  for (int64_t i = 0; i < C; ++i) {
    const float v = kGated ? E::load(E::store(E::load(x[i]) + gate[i] * E::load(y[i]))) : E::load(x[i]);
    xh[i] = (v - m) * r;
  }
}

// gw = g·w (kept), returns (Σ gw, Σ gw·x̂); with kMod also ds += g·x̂, db += g (the piece's column sums).
template <typename T, bool kMod>
inline std::pair<float, float> grad_row(const typename Elem<T>::storage* __restrict__ g_in, const float* __restrict__ xh,
                                 const float* __restrict__ w, float* __restrict__ gw, float* __restrict__ ds,
                                 float* __restrict__ db, int64_t C) {
  using E = Elem<T>;
  float a1[kLanes] = {}, a2[kLanes] = {};
  auto step = [&](int64_t i, int j) {
    const float g = E::load(g_in[i]);
    const float v = g * w[i];
    gw[i] = v;
    a1[j] += v;
    a2[j] += v * xh[i];
    if (kMod) {
      ds[i] += g * xh[i];
      db[i] += g;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  }
  for (int j = 0; i < C; ++i, ++j) step(i, j);
  return {lane_sum(a1), lane_sum(a2)};
}

// dh = (gw − c1 − x̂·c2)·rstd.
inline void dh_row(const float* __restrict__ gw, const float* __restrict__ xh, float c1, float c2, float r,
            float* __restrict__ dh, int64_t C) {
  for (int64_t i = 0; i < C; ++i) dh[i] = (gw[i] - c1 - xh[i] * c2) * r;
}

template <typename T>
inline void add_row(const typename Elem<T>::storage* __restrict__ g, float* __restrict__ dh, int64_t C) {
  for (int64_t i = 0; i < C; ++i) dh[i] += Elem<T>::load(g[i]);
}

template <typename T>
inline void load_row(const typename Elem<T>::storage* __restrict__ g, float* __restrict__ dh, int64_t C) {
  for (int64_t i = 0; i < C; ++i) dh[i] = Elem<T>::load(g[i]);
}

template <typename T>
inline void store_row(const float* __restrict__ v, typename Elem<T>::storage* __restrict__ out, int64_t C) {
  for (int64_t i = 0; i < C; ++i) out[i] = Elem<T>::store(v[i]);
}

// out = round(v·gate).
template <typename T>
inline void scaled_row(const float* __restrict__ v, const float* __restrict__ gate,
                typename Elem<T>::storage* __restrict__ out, int64_t C) {
  for (int64_t i = 0; i < C; ++i) out[i] = Elem<T>::store(v[i] * gate[i]);
}

// acc += v·y.
template <typename T>
inline void accumulate_row(const float* __restrict__ v, const typename Elem<T>::storage* __restrict__ y,
                    float* __restrict__ acc, int64_t C) {
  for (int64_t i = 0; i < C; ++i) acc[i] += v[i] * Elem<T>::load(y[i]);
}

// ------------------------------------------------------------------------------------------------ adaln forward

// Optional pieces of the gated form: gate fp32 [B, C] and y (x's strides may differ from y's).
struct Gated {
  const float* gate = nullptr;
  const at::Tensor* y = nullptr;
};

template <typename T>
NFTCORE_CLONES void adaln_forward_rows(Rows3<const typename Elem<T>::storage> x, const float* gate,
                                       Rows3<const typename Elem<T>::storage> y, const float* w, const float* shift,
                                       float eps, typename Elem<T>::storage* hp, typename Elem<T>::storage* o,
                                       float* mean, float* rstd, int64_t N, int64_t C, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / N, n = r - b * N;
    const auto* src = x.at(b, n);
    if (hp) {
      residual_row<T>(src, gate + b * C, y.at(b, n), hp + r * C, C);
      src = hp + r * C;  // normalise h as stored (rounded), as every backend does
    }
    float stats[2];
    adaln_row<T>(src, w + b * C, shift + b * C, o + r * C, C, eps, stats);
    mean[r] = stats[0];
    rstd[r] = stats[1];
  }
}

template <typename T>
void adaln_forward_kernel(const at::Tensor& x, const Gated& gated, const float* w, const float* shift, float eps,
                          at::Tensor* h, at::Tensor& out, float* mean, float* rstd) {
  const int64_t N = x.size(1), C = x.size(2);
  auto* o = mdata<T>(out);
  auto* hp = h ? mdata<T>(*h) : nullptr;
  const auto xr = rows3<T>(&x), yr = rows3<T>(gated.y);
  at::parallel_for(0, x.size(0) * N, row_grain(C), [&](int64_t lo, int64_t hi) {
    adaln_forward_rows<T>(xr, gated.gate, yr, w, shift, eps, hp, o, mean, rstd, N, C, lo, hi);
  });
}

// 1 + scale, fp32 [B, C] (the reference's w = scale.to(fp32) + 1).
at::Tensor one_plus(const at::Tensor& scale32) {
  at::Tensor w = at::empty(scale32.sizes(), scale32.options());
  const float* s = scale32.const_data_ptr<float>();
  float* o = w.mutable_data_ptr<float>();
  for (int64_t i = 0, n = w.numel(); i < n; ++i) o[i] = s[i] + 1.0f;
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_forward_common(
    const char* op, const at::Tensor& x_in, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& y,
    const at::Tensor& scale, const at::Tensor& shift, double eps) {
  check_x(op, x_in);
  const at::Tensor x = unit_c(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  const at::Tensor w = one_plus(vec32(op, "scale", scale, x)), b32 = vec32(op, "shift", shift, x);
  at::Tensor out = fresh_output(x.sizes(), x.options());
  at::Tensor h = gate ? fresh_output(x.sizes(), x.options()) : at::Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = x.numel() ? at::empty({B, N}, f32) : at::zeros({B, N}, f32);
  at::Tensor rstd = x.numel() ? at::empty({B, N}, f32) : at::zeros({B, N}, f32);
  if (x.numel() == 0) return {h, out, mean, rstd};
  at::Tensor gate32, y_u;
  Gated gated;
  if (gate) {
    gate32 = vec32(op, "gate", *gate, x);
    y_u = stream(op, "y", *y, x);
    gated = {gate32.const_data_ptr<float>(), &y_u};
  }
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    adaln_forward_kernel<T>(x, gated, w.const_data_ptr<float>(), b32.const_data_ptr<float>(),
                            static_cast<float>(eps), gate ? &h : nullptr, out, mean.mutable_data_ptr<float>(),
                            rstd.mutable_data_ptr<float>());
  });
  return {h, out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_forward(const at::Tensor& x, const at::Tensor& scale,
                                                             const at::Tensor& shift, double eps) {
  auto [h, out, mean, rstd] = adaln_forward_common("nftcore_native::adaln_forward", x, std::nullopt, std::nullopt,
                                                   scale, shift, eps);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_adaln_forward(const at::Tensor& x,
                                                                               const at::Tensor& gate,
                                                                               const at::Tensor& y,
                                                                               const at::Tensor& scale,
                                                                               const at::Tensor& shift, double eps) {
  return adaln_forward_common("nftcore_native::gated_adaln_forward", x, gate, y, scale, shift, eps);
}

// ------------------------------------------------------------------------------------------------ adaln backward

struct Backward {
  const at::Tensor* grad_out = nullptr;  // null: no gradient reached out
  const at::Tensor* grad_h = nullptr;    // null: none reached h (always, for plain adaln)
  const at::Tensor* x = nullptr;
  Gated gated;  // gate and y: the gated form
  const float *w = nullptr, *mean = nullptr, *rstd = nullptr;
  bool want_dx = false, want_dy = false, want_dgate = false, want_mod = false;
  at::Tensor dx, dy;
  float* ws = nullptr;  // [B, pieces, kSlots, C]
  Pieces pieces{1, 1};
};

// `Backward` as raw pointers for the row loops (a null base: that input is absent).
template <typename T>
struct BackwardRows {
  using S = typename Elem<T>::storage;
  Rows3<const S> grad_out, grad_h, x, y;
  const float *gate, *w, *mean, *rstd;
  S *dx, *dy;
  bool want_mod, want_dgate;
  int64_t N, C;

  explicit BackwardRows(const Backward& a)
      : grad_out(rows3<T>(a.grad_out)), grad_h(rows3<T>(a.grad_h)), x(rows3<T>(a.x)), y(rows3<T>(a.gated.y)),
        gate(a.gated.gate), w(a.w), mean(a.mean), rstd(a.rstd), dx(a.want_dx ? mdata<T>(a.dx) : nullptr),
        dy(a.want_dy ? mdata<T>(a.dy) : nullptr), want_mod(a.want_mod), want_dgate(a.want_dgate),
        N(a.x->size(1)), C(a.x->size(2)) {}
};

// Rows n0..n1 of sample b (one piece): dx, dy, and the piece's column sums into ws.
template <typename T>
NFTCORE_CLONES void adaln_backward_rows(const BackwardRows<T>& a, int64_t b, int64_t n0, int64_t n1, float* xh,
                                        float* gw, float* dh, float* ws) {
  const int64_t C = a.C;
  const float c = static_cast<float>(C);
  const float* gate = a.gate ? a.gate + b * C : nullptr;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = b * a.N + n;
    const auto* y = a.gate ? a.y.at(b, n) : nullptr;
    if (a.grad_out.base) {
      const auto* x = a.x.at(b, n);
      if (gate) {
        xhat_row<T, true>(x, gate, y, a.mean[r], a.rstd[r], xh, C);
      } else {
        xhat_row<T, false>(x, nullptr, nullptr, a.mean[r], a.rstd[r], xh, C);
      }
      const auto* g = a.grad_out.at(b, n);
      const auto sums = a.want_mod ? grad_row<T, true>(g, xh, a.w + b * C, gw, ws + kDScale * C, ws + kDShift * C, C)
                                   : grad_row<T, false>(g, xh, a.w + b * C, gw, nullptr, nullptr, C);
      dh_row(gw, xh, sums.first / c, sums.second / c, a.rstd[r], dh, C);
      if (a.grad_h.base) add_row<T>(a.grad_h.at(b, n), dh, C);
    } else if (a.grad_h.base) {
      load_row<T>(a.grad_h.at(b, n), dh, C);
    } else {
      std::fill(dh, dh + C, 0.0f);
    }
    if (a.dx) store_row<T>(dh, a.dx + r * C, C);
    if (a.dy) scaled_row<T>(dh, gate, a.dy + r * C, C);
    if (a.want_dgate) accumulate_row<T>(dh, y, ws + kDGate * C, C);
  }
}

template <typename T>
void adaln_backward_kernel(const Backward& a) {
  const int64_t B = a.x->size(0), N = a.x->size(1), C = a.x->size(2);
  const int64_t P = a.pieces.count;
  const BackwardRows<T> rows(a);
  at::parallel_for(0, B * P, std::max<int64_t>(1, row_grain(C) / a.pieces.size), [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(3 * C);
    float *xh = scratch.data(), *gw = xh + C, *dh = gw + C;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / P, p = task % P;
      float* ws = a.ws ? a.ws + task * kSlots * C : nullptr;
      if (ws) std::fill(ws, ws + kSlots * C, 0.0f);
      const int64_t begin = p * a.pieces.size, end = std::min(N, begin + a.pieces.size);
      adaln_backward_rows<T>(rows, b, begin, end, xh, gw, dh, ws);
    }
  });
}

// The gradients of (out, mean, rstd) = adaln(h) (+ grad_h into dh for the gated form): dx, dgate, dy, dscale,
// dshift; masked-out ones are fresh [0] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_backward_common(
    const char* op, const std::optional<at::Tensor>& grad_h, const std::optional<at::Tensor>& grad_out,
    const at::Tensor& x_in, const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& y,
    const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, std::array<bool, 5> mask) {
  check_x(op, x_in);
  const at::Tensor x = unit_c(x_in);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const bool gated = gate.has_value();
  Backward a;
  a.x = &x;
  a.want_dx = mask[0];
  a.want_dgate = gated && mask[1];
  a.want_dy = gated && mask[2];
  a.want_mod = (mask[3] || mask[4]) && grad_out.has_value();
  const at::Tensor w = one_plus(vec32(op, "scale", scale, x));
  const at::Tensor mean32 = stat32(op, "mean", mean, x), rstd32 = stat32(op, "rstd", rstd, x);
  a.w = w.const_data_ptr<float>();
  a.mean = mean32.const_data_ptr<float>();
  a.rstd = rstd32.const_data_ptr<float>();
  at::Tensor go, gh, gate32, y_u;
  if (grad_out) {
    go = stream(op, "grad_out", *grad_out, x);
    a.grad_out = &go;
  }
  if (gated) {
    TORCH_CHECK(y.has_value(), op, ": the gated form needs y");
    gate32 = vec32(op, "gate", *gate, x);
    y_u = stream(op, "y", *y, x);
    a.gated = {gate32.const_data_ptr<float>(), &y_u};
    if (grad_h) {
      gh = stream(op, "grad_h", *grad_h, x);
      a.grad_h = &gh;
    }
  }
  if (a.want_dx) a.dx = fresh_output(x.sizes(), x.options());
  if (a.want_dy) a.dy = fresh_output(x.sizes(), x.options());
  a.pieces = row_pieces(N, C);
  const bool sums = a.want_mod || a.want_dgate;
  at::Tensor ws = at::empty({sums ? B * a.pieces.count * kSlots * C : 0}, x.options().dtype(at::kFloat));
  a.ws = sums ? ws.mutable_data_ptr<float>() : nullptr;
  if (a.want_dx || a.want_dy || sums) {
    dispatch_float(x.scalar_type(), op, [&](auto tag) { adaln_backward_kernel<typename decltype(tag)::type>(a); });
  }
  auto column_sums = [&](Slot slot, at::ScalarType dtype) {
    return reduce_pieces(a.ws, B, a.pieces.count, kSlots, slot, C, x.options()).to(dtype);
  };
  auto zeros_bc = [&](at::ScalarType dtype) { return at::zeros({B, C}, x.options().dtype(dtype)); };
  at::Tensor dscale = !mask[3] ? none_like(x) : a.want_mod ? column_sums(kDScale, scale.scalar_type())
                                                           : zeros_bc(scale.scalar_type());
  at::Tensor dshift = !mask[4] ? none_like(x) : a.want_mod ? column_sums(kDShift, scale.scalar_type())
                                                           : zeros_bc(scale.scalar_type());
  at::Tensor dgate = a.want_dgate ? column_sums(kDGate, gate->scalar_type()) : none_like(x);
  return {a.want_dx ? a.dx : none_like(x), dgate, a.want_dy ? a.dy : none_like(x), dscale, dshift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& scale, const at::Tensor& mean,
                                                              const at::Tensor& rstd, std::array<bool, 3> mask) {
  auto [dx, dgate, dy, dscale, dshift] =
      adaln_backward_common("nftcore_native::adaln_backward", std::nullopt, grad_out, x, std::nullopt, std::nullopt,
                            scale, mean, rstd, {mask[0], false, false, mask[1], mask[2]});
  return {dx, dscale, dshift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_adaln_backward(
    const std::optional<at::Tensor>& grad_h, const std::optional<at::Tensor>& grad_out, const at::Tensor& x,
    const at::Tensor& gate, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, std::array<bool, 5> mask) {
  return adaln_backward_common("nftcore_native::gated_adaln_backward", grad_h, grad_out, x, gate, y, scale, mean,
                               rstd, mask);
}

// ------------------------------------------------------------------------------------------------ gated residual

template <typename T>
NFTCORE_CLONES void residual_rows(Rows3<const typename Elem<T>::storage> x, const float* gate,
                                  Rows3<const typename Elem<T>::storage> y, typename Elem<T>::storage* o, int64_t N,
                                  int64_t C, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / N, n = r - b * N;
    residual_row<T>(x.at(b, n), gate + b * C, y.at(b, n), o + r * C, C);
  }
}

at::Tensor gated_residual_forward(const at::Tensor& x_in, const at::Tensor& gate, const at::Tensor& y) {
  const char* op = "nftcore_native::gated_residual_forward";
  check_x(op, x_in);
  const at::Tensor x = unit_c(x_in), y_u = stream(op, "y", y, x), gate32 = vec32(op, "gate", gate, x);
  at::Tensor out = fresh_output(x.sizes(), x.options());
  const int64_t N = x.size(1), C = x.size(2);
  const float* g = gate32.const_data_ptr<float>();
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* o = mdata<T>(out);
    const auto xr = rows3<T>(&x), yr = rows3<T>(&y_u);
    at::parallel_for(0, x.size(0) * N, row_grain(C), [&](int64_t lo, int64_t hi) {
      residual_rows<T>(xr, g, yr, o, N, C, lo, hi);
    });
  });
  return out;
}

// dy = gate·grad and the pieces of Σ grad·y, one row at a time.
template <typename T>
NFTCORE_CLONES void residual_backward_rows(Rows3<const typename Elem<T>::storage> grad, const float* gate,
                                           Rows3<const typename Elem<T>::storage> y, typename Elem<T>::storage* dy,
                                           float* acc, float* g, int64_t b, int64_t n0, int64_t n1, int64_t N,
                                           int64_t C) {
  for (int64_t n = n0; n < n1; ++n) {
    load_row<T>(grad.at(b, n), g, C);
    if (dy) scaled_row<T>(g, gate + b * C, dy + (b * N + n) * C, C);
    if (acc) accumulate_row<T>(g, y.at(b, n), acc, C);
  }
}

template <typename T>
void gated_residual_backward_kernel(const at::Tensor& grad, const float* gate, const at::Tensor* y, at::Tensor* dy,
                                    float* ws, const Pieces& pieces) {
  const int64_t B = grad.size(0), N = grad.size(1), C = grad.size(2), P = pieces.count;
  const auto gr = rows3<T>(&grad), yr = rows3<T>(y);
  auto* dyp = dy ? mdata<T>(*dy) : nullptr;
  at::parallel_for(0, B * P, std::max<int64_t>(1, row_grain(C) / pieces.size), [&](int64_t lo, int64_t hi) {
    std::vector<float> g(C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / P, p = task % P;
      float* acc = ws ? ws + task * C : nullptr;
      if (acc) std::fill(acc, acc + C, 0.0f);
      const int64_t begin = p * pieces.size, end = std::min(N, begin + pieces.size);
      residual_backward_rows<T>(gr, gate, yr, dyp, acc, g.data(), b, begin, end, N, C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& grad_in,
                                                          const std::optional<at::Tensor>& gate,
                                                          const std::optional<at::Tensor>& y,
                                                          std::array<bool, 2> mask) {
  const char* op = "nftcore_native::gated_residual_backward";
  check_x(op, grad_in);
  const bool want_dgate = mask[0], want_dy = mask[1];
  TORCH_CHECK(!want_dgate || y.has_value(), op, ": dgate needs y");
  TORCH_CHECK(!want_dy || gate.has_value(), op, ": dy needs gate");
  TORCH_CHECK(gate.has_value() || y.has_value(), op, ": needs gate or y (the dtype of dgate)");
  const at::Tensor grad = unit_c(grad_in);
  const int64_t B = grad.size(0), N = grad.size(1), C = grad.size(2);
  at::Tensor gate32, y_u, dy;
  if (want_dy) {
    gate32 = vec32(op, "gate", *gate, grad);
    dy = fresh_output(grad.sizes(), grad.options());
  }
  if (want_dgate) y_u = stream(op, "y", *y, grad);
  const Pieces pieces = row_pieces(N, C);
  at::Tensor ws = at::empty({want_dgate ? B * pieces.count * C : 0}, grad.options().dtype(at::kFloat));
  if (want_dy || want_dgate) {
    dispatch_float(grad.scalar_type(), op, [&](auto tag) {
      gated_residual_backward_kernel<typename decltype(tag)::type>(
          grad, want_dy ? gate32.const_data_ptr<float>() : nullptr, want_dgate ? &y_u : nullptr,
          want_dy ? &dy : nullptr, want_dgate ? ws.mutable_data_ptr<float>() : nullptr, pieces);
    });
  }
  const at::ScalarType gate_dtype = gate ? gate->scalar_type() : y->scalar_type();
  at::Tensor dgate = want_dgate
                         ? reduce_pieces(ws.const_data_ptr<float>(), B, pieces.count, 1, 0, C, grad.options())
                               .to(gate_dtype)
                         : none_like(grad);
  return {dgate, want_dy ? dy : none_like(grad)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nftcore_native, m) {
  m.def("adaln_forward(Tensor x, Tensor scale, Tensor shift, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "adaln_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "gated_adaln_forward(Tensor x, Tensor gate, Tensor y, Tensor scale, Tensor shift, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gated_adaln_backward(Tensor? grad_h, Tensor? grad_out, Tensor x, Tensor gate, Tensor y, Tensor scale, "
      "Tensor mean, Tensor rstd, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_forward(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad, Tensor? gate, Tensor? y, bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nftcore_native, CPU, m) {
  m.impl("adaln_forward", &adaln_forward);
  m.impl("adaln_backward", &adaln_backward);
  m.impl("gated_adaln_forward", &gated_adaln_forward);
  m.impl("gated_adaln_backward", &gated_adaln_backward);
  m.impl("gated_residual_forward", &gated_residual_forward);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace nftcore_native
