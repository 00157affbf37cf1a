// gelu_tanh: the MMDiT MLPs' activation (diffusers' "gelu-approximate"), forward and backward, element-wise.
//
//   y = 0.5·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
//
// evaluated as y = x·σ(2u) with σ(t) = 1 / (1 + e^{−t}) (the same function: 0.5·(1 + tanh(u)) = σ(2u)), so the loop
// needs only common.h's branch-free exp and vectorises; ATen evaluates tanh with a vector library instead. The
// backward is dy/dx = s + x·s·(1 − s)·2·√(2/π)·(1 + 3·0.044715·x²) with s = σ(2u). σ comes from t = e^{−2|u|} ≤ 1:
// s = 1/(1 + t) or t/(1 + t) by the sign of u, and s·(1 − s) = t/(1 + t)², so nothing overflows or cancels. Both are
// within a few ulp of the exact function (tests bound them against fp64 by the eager op's own error). fp32 math, one
// rounding on store; inputs of any layout are made contiguous first (the MLP's are already).
//
// gelu_tanh_forward_ is the in-place forward of the no-grad MLPs (x overwritten by y, one [B, N, 4C] buffer less at
// the rollout peak): the same per-element function as the out-of-place forward (gelu_value), so the same bits. A
// dense layout (contiguous or permuted) is rewritten where it lies; a strided view with gaps is computed out of place
// and copied back (one temporary); a tensor whose elements overlap (expanded) is refused, as aten's in-place ops do.
#include "rows.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace nftcore_native {
namespace {

constexpr float kBeta = 0.7978845608028654f;  // √(2/π)
constexpr float kKappa = 0.044715f;
constexpr int64_t kGrain = 1 << 14;  // elements per parallel task

// y = x·σ(2u) for one element, shared by both forwards so that they round alike.
inline __attribute__((always_inline)) float gelu_value(float v) {
  const float u = kBeta * (v + kKappa * (v * v * v));
  const float t = exp_fast(-2.0f * (u < 0.0f ? -u : u));
  const float r = 1.0f / (1.0f + t);
  return v * (u < 0.0f ? t * r : r);
}

template <typename T>
NFTCORE_CLONES void gelu_span(const typename Elem<T>::storage* __restrict__ x, typename Elem<T>::storage* __restrict__ y,
                              int64_t n) {
  using E = Elem<T>;
  for (int64_t i = 0; i < n; ++i) y[i] = E::store(gelu_value(E::load(x[i])));
}

// In place: one pointer, no __restrict__ pair (x and y are the same memory), each element read before it is written.
template <typename T>
NFTCORE_CLONES void gelu_inplace_span(typename Elem<T>::storage* x, int64_t n) {
  using E = Elem<T>;
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(gelu_value(E::load(x[i])));
}

template <typename T>
NFTCORE_CLONES void gelu_backward_span(const typename Elem<T>::storage* __restrict__ g,
                                       const typename Elem<T>::storage* __restrict__ x,
                                       typename Elem<T>::storage* __restrict__ dx, int64_t n) {
  using E = Elem<T>;
  for (int64_t i = 0; i < n; ++i) {
    const float v = E::load(x[i]);
    const float v2 = v * v;
    const float u = kBeta * (v + kKappa * (v2 * v));
    const float t = exp_fast(-2.0f * (u < 0.0f ? -u : u));
    const float r = 1.0f / (1.0f + t);
    const float s = u < 0.0f ? t * r : r;  // σ(2u)
    const float du = kBeta * (1.0f + 3.0f * kKappa * v2);
    dx[i] = E::store(E::load(g[i]) * (s + v * (t * r * r) * 2.0f * du));
  }
}

void check_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name, "` must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_native_float(t.scalar_type()), op, ": `", name, "` must be float32, bfloat16 or float16, got ",
              t.scalar_type());
}

}  // namespace

at::Tensor gelu_tanh_forward(const at::Tensor& x_in) {
  const char* op = "nftcore_native::gelu_tanh_forward";
  check_input(op, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = fresh_output(x.sizes(), x.options());
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* xs = cdata<T>(x);
    auto* ys = mdata<T>(y);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t lo, int64_t hi) { gelu_span<T>(xs + lo, ys + lo, hi - lo); });
  });
  return y;
}

at::Tensor gelu_tanh_forward_(const at::Tensor& x) {
  const char* op = "nftcore_native::gelu_tanh_forward_";
  check_input(op, "x", x);
  at::assert_no_internal_overlap(x);
  if (x.numel() == 0) return x;
  if (!x.is_non_overlapping_and_dense()) {  // a view with gaps: out of place, then written back
    x.copy_(gelu_tanh_forward(x));
    return x;
  }
  // Dense with non-negative strides: the elements fill [data_ptr, data_ptr + numel) in some order, and an
  // element-wise op does not care which.
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto* xs = mdata<T>(x);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t lo, int64_t hi) { gelu_inplace_span<T>(xs + lo, hi - lo); });
  });
  return x;
}

at::Tensor gelu_tanh_backward(const at::Tensor& grad_in, const at::Tensor& x_in) {
  const char* op = "nftcore_native::gelu_tanh_backward";
  check_input(op, "grad", grad_in);
  check_input(op, "x", x_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(), op,
              ": `grad` must match `x` in shape and dtype, got ", grad_in.sizes(), " ", grad_in.scalar_type(),
              " and ", x_in.sizes(), " ", x_in.scalar_type());
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = fresh_output(x.sizes(), x.options());
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* gs = cdata<T>(g);
    const auto* xs = cdata<T>(x);
    auto* ds = mdata<T>(dx);
    at::parallel_for(0, x.numel(), kGrain,
                     [&](int64_t lo, int64_t hi) { gelu_backward_span<T>(gs + lo, xs + lo, ds + lo, hi - lo); });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(nftcore_native, m) {
  m.def("gelu_tanh_forward(Tensor x) -> Tensor");
  m.def("gelu_tanh_forward_(Tensor(a!) x) -> Tensor(a!)");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(nftcore_native, CPU, m) {
  m.impl("gelu_tanh_forward", &gelu_tanh_forward);
  m.impl("gelu_tanh_forward_", &gelu_tanh_forward_);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward);
}

}  // namespace nftcore_native
