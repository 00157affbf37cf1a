// The DiffusionNFT loss on CPU: the native backend of `nftcore.ops.nft_loss` (see nftcore/ops/nft_loss.py for the
// contract and kernels/nft_loss.py for the Triton kernels this mirrors, formula for formula).
//
// Two passes, like the Triton kernels, because the adaptive weight d± = max(mean|e±|, min_x0_error) is a reduction
// over a whole sample that every element's gradient needs:
//   pass 1: every (sample, piece of kPiece elements) task writes seven fp32 partial sums
//           Σ|e⁺|, Σe⁺², Σ|e⁻|, Σe⁻², Σ(v_θ − v_ref)², Σ(v_θ − v_old)², Σ(x_t − t·v_θ)²
//           (e± = x_t − t·v± − x0, v⁺ = β·v_θ + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v_θ);
//   between: per-sample totals (the pieces in index order, in fp64), the outputs and the gradient coefficients;
//   pass 2: ∂/∂v_θ = c⁻_i·e⁻ − c⁺_i·e⁺ (+ c_ref,i·(v_θ − v_ref)), stored in v_θ's dtype.
// Tasks are spread over ATen's intra-op threads with at::parallel_for; a task's sums do not depend on which thread
// runs it, so the results are bit-identical for any thread count.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace nftcore_native {
namespace {

constexpr int64_t kPiece = 4096;  // elements per task: fixed, so the summation order is too
constexpr int kSums = 7;
enum Sum { kAbsPos = 0, kSqPos, kAbsNeg, kSqNeg, kSqRef, kSqOld, kSqX0 };
// Below this many elements in all, one thread does everything (a fork costs more than the work).
constexpr int64_t kMinParallelElems = 1 << 15;

struct Branch {
  float beta, one_minus_beta, one_plus_beta;  // rounded to fp32 from fp64, as the reference's scalar ops round them
};

template <typename T>
struct Inputs {
  using S = typename Elem<T>::storage;
  const S* vt;
  const S* vo;
  const S* xt;
  const S* x0;
  const S* vr;  // nullptr without the KL term
  const float* t;
  int64_t n;
};

// Pass 1 for elements [begin, end) of sample b. kAll = false computes only Σ|e⁺| and Σ|e⁻| (all the backward needs).
template <typename T, bool kAll, bool kRef>
void partial_sums(const Inputs<T>& in, const Branch& br, int64_t b, int64_t begin, int64_t end, float* out) {
  using E = Elem<T>;
  const int64_t base = b * in.n;
  const auto* vt = in.vt + base;
  const auto* vo = in.vo + base;
  const auto* xt = in.xt + base;
  const auto* x0 = in.x0 + base;
  const auto* vr = kRef ? in.vr + base : nullptr;
  const float t = in.t[b], beta = br.beta, omb = br.one_minus_beta, opb = br.one_plus_beta;
  float acc[kSums][kLanes] = {};
  auto step = [&](int64_t i, int j) {
    const float v = E::load(vt[i]), o = E::load(vo[i]), x = E::load(xt[i]), z0 = E::load(x0[i]);
    // The reference's operation order: (x_t − t·v±) − x0.
    const float ep = (x - t * (beta * v + omb * o)) - z0;
    const float en = (x - t * (opb * o - beta * v)) - z0;
    acc[kAbsPos][j] += std::fabs(ep);
    acc[kAbsNeg][j] += std::fabs(en);
    if (kAll) {
      acc[kSqPos][j] += ep * ep;
      acc[kSqNeg][j] += en * en;
      if (kRef) {
        const float d = v - E::load(vr[i]);
        acc[kSqRef][j] += d * d;
      }
      const float d_old = v - o;
      acc[kSqOld][j] += d_old * d_old;
      const float x_hat = x - t * v;
      acc[kSqX0][j] += x_hat * x_hat;
    }
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) step(i + j, j);
  }
  for (int j = 0; i < end; ++i, ++j) step(i, j);
  for (int k = 0; k < kSums; ++k) out[k] = lane_sum(acc[k]);
}

// Pass 2 for elements [begin, end) of sample b: the gradient with per-sample coefficients c_pos, c_neg, c_ref.
template <typename T, bool kRef>
void gradient(const Inputs<T>& in, const Branch& br, int64_t b, int64_t begin, int64_t end, float c_pos, float c_neg,
              float c_ref, typename Elem<T>::storage* grad) {
  using E = Elem<T>;
  const int64_t base = b * in.n;
  const auto* vt = in.vt + base;
  const auto* vo = in.vo + base;
  const auto* xt = in.xt + base;
  const auto* x0 = in.x0 + base;
  const auto* vr = kRef ? in.vr + base : nullptr;
  auto* g = grad + base;
  const float t = in.t[b], beta = br.beta, omb = br.one_minus_beta, opb = br.one_plus_beta;
  for (int64_t i = begin; i < end; ++i) {
    const float v = E::load(vt[i]), o = E::load(vo[i]), x = E::load(xt[i]), z0 = E::load(x0[i]);
    const float ep = (x - t * (beta * v + omb * o)) - z0;
    const float en = (x - t * (opb * o - beta * v)) - z0;
    float d = c_neg * en - c_pos * ep;
    if (kRef) d += c_ref * (v - E::load(vr[i]));
    g[i] = E::store(d);
  }
}

// Per-sample totals of the workspace [B, pieces, kSums], pieces summed in index order in fp64.
std::vector<double> sample_totals(const std::vector<float>& ws, int64_t B, int64_t pieces) {
  std::vector<double> tot(B * kSums, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < pieces; ++p) {
      for (int k = 0; k < kSums; ++k) tot[b * kSums + k] += ws[(b * pieces + p) * kSums + k];
    }
  }
  return tot;
}

// max(x, floor) that keeps a NaN, as torch.clamp_min does.
inline double clamp_min_nan(double x, double floor) { return std::isnan(x) ? x : std::max(x, floor); }

struct Hyper {
  double beta, loss_scale, kl_weight, negative_weight, min_x0_error;
};

// Both passes over the flattened [B, n] inputs. With `outputs` the six loss outputs are written from pass 1's sums;
// with `grad` pass 2 runs, its routes being m_i/max(Σm, 1) (the gradient of `loss`) unless `route_policy` and
// `route_kl` are given (the general backward).
template <typename T>
void run(const Inputs<T>& in, int64_t B, bool has_ref, const float* r, const float* mask, const Hyper& hp,
         const float* route_policy, const float* route_kl, float* outputs /* loss, policy, kl, old_dev, x0_norm */,
         float* per_sample, typename Elem<T>::storage* grad) {
  const int64_t n = in.n;
  const int64_t pieces = std::max<int64_t>(1, (n + kPiece - 1) / kPiece);
  const int64_t tasks = B * pieces;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(1, std::min(n, kPiece)));
  const Branch br{static_cast<float>(hp.beta), static_cast<float>(1.0 - hp.beta), static_cast<float>(1.0 + hp.beta)};
  const bool all = outputs != nullptr;
  std::vector<float> ws(tasks * kSums, 0.0f);

  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / pieces, p = task % pieces;
      const int64_t begin = p * kPiece, end = std::min(n, begin + kPiece);
      float* out = ws.data() + task * kSums;
      if (!all) {
        partial_sums<T, false, false>(in, br, b, begin, end, out);
      } else if (has_ref) {
        partial_sums<T, true, true>(in, br, b, begin, end, out);
      } else {
        partial_sums<T, true, false>(in, br, b, begin, end, out);
      }
    }
  });

  const std::vector<double> tot = sample_totals(ws, B, pieces);
  const double n_f = static_cast<double>(n);
  double mask_sum = 0.0;
  for (int64_t b = 0; b < B; ++b) mask_sum += mask[b];
  const double denom = std::max(mask_sum, 1.0);  // all-zero mask: a zero loss, not 0/0
  std::vector<double> d_pos(B), d_neg(B);
  for (int64_t b = 0; b < B; ++b) {
    d_pos[b] = clamp_min_nan(tot[b * kSums + kAbsPos] / n_f, hp.min_x0_error);
    d_neg[b] = clamp_min_nan(tot[b * kSums + kAbsNeg] / n_f, hp.min_x0_error);
  }

  if (all) {
    double policy_loss = 0.0, kl_loss = 0.0, old_dev = 0.0, x0_norm = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      const double* s = tot.data() + b * kSums;
      const double rb = r[b], mb = mask[b];
      const double loss_pos = (s[kSqPos] / n_f) / d_pos[b];
      const double loss_neg = (s[kSqNeg] / n_f) / d_neg[b];
      const double policy = (hp.loss_scale / hp.beta) * (rb * loss_pos + hp.negative_weight * (1.0 - rb) * loss_neg);
      const double kl = has_ref ? hp.kl_weight * (s[kSqRef] / n_f) : 0.0;
      per_sample[b] = static_cast<float>(policy + kl);
      policy_loss += policy * mb;
      kl_loss += kl * mb;
      old_dev += (s[kSqOld] / n_f) * mb;
      x0_norm += (s[kSqX0] / n_f) * mb;
    }
    policy_loss /= denom;
    kl_loss /= denom;
    outputs[0] = static_cast<float>(policy_loss + kl_loss);
    outputs[1] = static_cast<float>(policy_loss);
    outputs[2] = static_cast<float>(kl_loss);
    outputs[3] = static_cast<float>(old_dev / denom);
    outputs[4] = static_cast<float>(x0_norm / denom);
  }

  if (grad == nullptr) return;
  std::vector<float> c_pos(B), c_neg(B), c_ref(B);
  for (int64_t b = 0; b < B; ++b) {
    const double rp = route_policy ? route_policy[b] : mask[b] / denom;
    const double rk = route_kl ? route_kl[b] : mask[b] / denom;
    const double coef = (2.0 * hp.loss_scale / n_f) * static_cast<double>(in.t[b]) * rp;
    c_pos[b] = static_cast<float>(coef * r[b] / d_pos[b]);
    c_neg[b] = static_cast<float>(coef * hp.negative_weight * (1.0 - r[b]) / d_neg[b]);
    c_ref[b] = static_cast<float>((2.0 * hp.kl_weight / n_f) * rk);
  }
  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    // Backwards through this thread's range: its last pieces of pass 1 are the ones most likely still in cache.
    for (int64_t task = hi - 1; task >= lo; --task) {
      const int64_t b = task / pieces, p = task % pieces;
      const int64_t begin = p * kPiece, end = std::min(n, begin + kPiece);
      if (has_ref) {
        gradient<T, true>(in, br, b, begin, end, c_pos[b], c_neg[b], c_ref[b], grad);
      } else {
        gradient<T, false>(in, br, b, begin, end, c_pos[b], c_neg[b], c_ref[b], grad);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------- op wrappers

struct Prepared {
  at::Tensor vt, vo, xt, x0, vr;  // contiguous, one dtype (fp32 when the inputs mixed dtypes)
  at::Tensor t, r, mask;          // contiguous fp32 [B]
  int64_t B = 0, n = 0;
  bool has_ref = false;
};

Prepared prepare(const char* op, const at::Tensor& v_theta, const at::Tensor& v_old, const at::Tensor& x_t,
                 const at::Tensor& x0, const at::Tensor& t, const at::Tensor& r, const at::Tensor& mask,
                 const std::optional<at::Tensor>& v_ref, double kl_weight) {
  Prepared p;
  p.has_ref = v_ref.has_value() && v_ref->defined() && kl_weight != 0.0;
  TORCH_CHECK(v_theta.dim() >= 1, op, ": v_theta must be [B, ...]");
  std::vector<at::Tensor> big = {v_theta, v_old, x_t, x0};
  if (p.has_ref) big.push_back(*v_ref);
  bool same_dtype = true;
  for (const auto& x : big) {
    TORCH_CHECK(x.device().is_cpu(), op, ": native kernels take CPU tensors");
    TORCH_CHECK(x.sizes() == v_theta.sizes(), op, ": every [B, ...] input must have v_theta's shape");
    TORCH_CHECK(is_native_float(x.scalar_type()), op, ": native kernels take float32, bfloat16 or float16, got ",
                x.scalar_type());
    same_dtype = same_dtype && x.scalar_type() == v_theta.scalar_type();
  }
  for (auto& x : big) {
    x = same_dtype ? x.contiguous() : x.to(at::kFloat).contiguous();  // mixed dtypes: upcast (exact) and compute once
  }
  p.vt = big[0];
  p.vo = big[1];
  p.xt = big[2];
  p.x0 = big[3];
  if (p.has_ref) p.vr = big[4];
  p.B = v_theta.size(0);
  p.n = p.B > 0 ? v_theta.numel() / p.B : 0;
  for (const auto* s : {&t, &r, &mask}) {
    TORCH_CHECK(s->numel() == p.B, op, ": t, r and mask must have B = ", p.B, " elements");
  }
  p.t = t.to(at::kFloat).contiguous();
  p.r = r.to(at::kFloat).contiguous();
  p.mask = mask.to(at::kFloat).contiguous();
  return p;
}

template <typename T>
Inputs<T> inputs_of(const Prepared& p) {
  return Inputs<T>{cdata<T>(p.vt), cdata<T>(p.vo), cdata<T>(p.xt), cdata<T>(p.x0),
                   p.has_ref ? cdata<T>(p.vr) : nullptr, p.t.const_data_ptr<float>(), p.n};
}

// The gradient as the op returns it: v_theta's dtype and, like the fake implementation's empty_like, v_theta's layout.
// The kernels write a contiguous [B, n] buffer in their own dtype; only a non-contiguous v_theta or mixed input dtypes
// cost a copy here.
at::Tensor finish_grad(const at::Tensor& buf, const at::Tensor& v_theta) {
  if (buf.scalar_type() == v_theta.scalar_type() && v_theta.is_contiguous()) return buf;
  return at::empty_like(v_theta).copy_(buf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nft_loss_forward(
    const at::Tensor& v_theta, const at::Tensor& v_old, const at::Tensor& x_t, const at::Tensor& x0,
    const at::Tensor& t, const at::Tensor& r, const at::Tensor& mask, const std::optional<at::Tensor>& v_ref,
    double beta, double loss_scale, double kl_weight, double negative_weight, bool want_grad, double min_x0_error) {
  const char* op = "nftcore_native::nft_loss_forward";
  Prepared p = prepare(op, v_theta, v_old, x_t, x0, t, r, mask, v_ref, kl_weight);
  const auto f32 = v_theta.options().dtype(at::kFloat);
  float scalars[5] = {};
  at::Tensor per_sample = at::empty({p.B}, f32);
  at::Tensor grad = want_grad ? at::empty(v_theta.sizes(), p.vt.options()) : at::empty({0}, v_theta.options());
  const Hyper hp{beta, loss_scale, kl_weight, negative_weight, min_x0_error};
  dispatch_float(p.vt.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    run<T>(inputs_of<T>(p), p.B, p.has_ref, p.r.const_data_ptr<float>(), p.mask.const_data_ptr<float>(), hp, nullptr,
           nullptr, scalars, per_sample.mutable_data_ptr<float>(),
           want_grad ? mdata<T>(grad) : nullptr);
  });
  auto scalar = [&](float v) {  // separate 0-dim tensors: the op's outputs must not alias each other
    at::Tensor x = at::empty({}, f32);
    *x.mutable_data_ptr<float>() = v;
    return x;
  };
  return {scalar(scalars[0]), scalar(scalars[1]), scalar(scalars[2]), per_sample, scalar(scalars[3]),
          scalar(scalars[4]), want_grad ? finish_grad(grad, v_theta) : grad};
}

at::Tensor nft_loss_backward(const at::Tensor& route_policy, const at::Tensor& route_kl, const at::Tensor& v_theta,
                             const at::Tensor& v_old, const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& t,
                             const at::Tensor& r, const at::Tensor& mask, const std::optional<at::Tensor>& v_ref,
                             double beta, double loss_scale, double kl_weight, double negative_weight,
                             double min_x0_error) {
  const char* op = "nftcore_native::nft_loss_backward";
  Prepared p = prepare(op, v_theta, v_old, x_t, x0, t, r, mask, v_ref, kl_weight);
  TORCH_CHECK(route_policy.numel() == p.B && route_kl.numel() == p.B, op, ": routes must have B = ", p.B,
              " elements");
  const at::Tensor rp = route_policy.to(at::kFloat).contiguous(), rk = route_kl.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty(v_theta.sizes(), p.vt.options());
  const Hyper hp{beta, loss_scale, kl_weight, negative_weight, min_x0_error};
  dispatch_float(p.vt.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    run<T>(inputs_of<T>(p), p.B, p.has_ref, p.r.const_data_ptr<float>(), p.mask.const_data_ptr<float>(), hp,
           rp.const_data_ptr<float>(), rk.const_data_ptr<float>(), nullptr, nullptr, mdata<T>(grad));
  });
  return finish_grad(grad, v_theta);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nftcore_native, m) {
  m.def(
      "nft_loss_forward(Tensor v_theta, Tensor v_old, Tensor x_t, Tensor x0, Tensor t, Tensor r, Tensor mask, "
      "Tensor? v_ref, float beta, float loss_scale, float kl_weight, float negative_weight, bool want_grad, "
      "float min_x0_error) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "nft_loss_backward(Tensor route_policy, Tensor route_kl, Tensor v_theta, Tensor v_old, Tensor x_t, Tensor x0, "
      "Tensor t, Tensor r, Tensor mask, Tensor? v_ref, float beta, float loss_scale, float kl_weight, "
      "float negative_weight, float min_x0_error) -> Tensor");
}

TORCH_LIBRARY_IMPL(nftcore_native, CPU, m) {
  m.impl("nft_loss_forward", &nft_loss_forward);
  m.impl("nft_loss_backward", &nft_loss_backward);
}

}  // namespace nftcore_native
