// Log-probabilities of K chosen tokens from the final hidden state and the LM head on CPU: the native backend of
// `nftcore.ops.score_logits` (contract in nftcore/ops/score_logits.py; the Triton kernels are kernels/score_logits.py).
//
// - The K selected logits z[m, k] = hidden[m] · W[id_k] are fp32 dot products with a fixed summation order
//   (kLanes interleaved accumulators, then a fixed tree), rows spread over threads: any thread count, same bits.
// - subset: lse[m] = logsumexp over those K logits.
// - full: lse[m] = logsumexp over the whole vocabulary, streamed: the head goes through in chunks of `chunk_rows`
//   vocabulary rows (the Python side sizes them with the same byte budgets as the reference, so the memory bound and
//   its test are shared); each chunk's [M, C] fp32 logits come from one library GEMM (oneDNN through
//   mkldnn::_linear_pointwise when torch has it, else at::mm), then one fused pass per row updates a running
//   (max, Σexp) pair. Only one chunk of logits is ever alive: never [M, V]. A 16-bit head is widened chunk by chunk into
//   one reused fp32 staging buffer (CPU GEMMs on 16-bit inputs round their output to 16 bits).
// Outputs, as every backend's: out [M, K] fp32 = z − lse, lse [M] fp32.
#include "common.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

namespace nftcore_native {
namespace {

constexpr int64_t kMinParallelElems = 1 << 15;  // below this much work per call, one thread

// fp32 dot product of a fp32 row and a row of the head, in the fixed lane order.
template <typename TW>
float dot(const float* h, const typename Elem<TW>::storage* w, int64_t H) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= H; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += h[i + j] * Elem<TW>::load(w[i + j]);
  }
  for (int j = 0; i < H; ++i, ++j) acc[j] += h[i] * Elem<TW>::load(w[i]);
  return lane_sum(acc);
}

// z[m, k] = hidden[m] · W[ids[k]] for all rows, parallel over rows.
template <typename TW>
void selected_logits(const float* hidden, int64_t M, int64_t H, const at::Tensor& weight, const int64_t* ids,
                     int64_t K, float* z) {
  const auto* w = cdata<TW>(weight);
  const int64_t ws = weight.stride(0);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(1, K * H));
  at::parallel_for(0, M, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      for (int64_t k = 0; k < K; ++k) z[m * K + k] = dot<TW>(hidden + m * H, w + ids[k] * ws, H);
    }
  });
}

// logsumexp of n values, as torch.logsumexp: shifted by the max, unless the max is infinite (then by 0).
float logsumexp(const float* z, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = z[i] > mx ? z[i] : mx;
  const float shift = std::isinf(mx) ? 0.0f : mx;
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += std::exp(z[i] - shift);
  return shift + std::log(s);
}

// Max of a row, in the fixed lane order (a NaN is skipped here; it still reaches the sum below, so lse is NaN).
float row_max(const float* z, int64_t n) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] = z[i + j] > acc[j] ? z[i + j] : acc[j];
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] = z[i] > acc[j] ? z[i] : acc[j];
  return lane_max(acc);
}

// Σ exp(z[i] − shift) over a row, in the fixed lane order, with the vectorised exp.
float row_sum_exp(const float* z, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += exp_fast(z[i + j] - shift);
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += exp_fast(z[i] - shift);
  return lane_sum(acc);
}

// Widens rows [v0, v0 + rows) of a 16-bit head into the fp32 staging buffer, parallel over rows.
template <typename TW>
void stage_rows(const at::Tensor& weight, int64_t v0, int64_t rows, float* stage) {
  const auto* w = cdata<TW>(weight);
  const int64_t H = weight.size(1), ws = weight.stride(0);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(1, H));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t v = lo; v < hi; ++v) {
      const auto* src = w + (v0 + v) * ws;
      float* dst = stage + v * H;
      for (int64_t i = 0; i < H; ++i) dst[i] = Elem<TW>::load(src[i]);
    }
  });
}

// ------------------------------------------------------------------------------------------------- chunk GEMMs

// oneDNN's fp32 matmul through torch's own registration of it (the op inductor uses for CPU linears), found once at
// run time. On the AMD EPYC of our CPU machines MKL's sgemm (what at::mm calls) is 1.2-2x slower than oneDNN's JIT
// kernels at the Qwen head's chunks (M = 1..288, H = 3584), so oneDNN is the default for chunks of at least
// kOneDnnMinMacs multiply-adds; below that its per-call cost loses (0.7-1.0x at M = 64, H = 72). NFTCORE_NATIVE_GEMM=aten
// forces at::mm. Precision is fp32 either way (both follow torch's float32 matmul precision setting). Memory: oneDNN
// takes a per-thread scratch buffer from torch's allocator (~256 KiB per thread at H = 3584, bounded by its blocking,
// not by the chunk); MKL's packing buffers are its own and invisible to torch's memory accounting.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 22;

const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return handle.has_value() ? &*handle : nullptr;
}

// Set when a oneDNN call threw (an unsupported build or input): at::mm from then on, after one warning.
std::atomic<bool> onednn_failed{false};

bool use_onednn() {
  const char* env = std::getenv("NFTCORE_NATIVE_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  return !onednn_failed.load() && onednn_linear() != nullptr && at::globalContext().userEnabledMkldnn();
}

// [M, C] fp32 logits of one chunk: h [M, H] fp32 contiguous, w [C, H] fp32 with unit stride along H.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w, bool onednn) {
  if (onednn && !onednn_failed.load() && w.is_contiguous() && h.size(0) * w.size(0) * w.size(1) >= kOneDnnMinMacs) {
    try {
      torch::jit::Stack stack;
      stack.emplace_back(h);
      stack.emplace_back(w);
      stack.emplace_back(c10::IValue());  // no bias
      stack.emplace_back(std::string("none"));
      stack.emplace_back(c10::List<std::optional<at::Scalar>>());
      stack.emplace_back(c10::IValue());  // algorithm
      onednn_linear()->callBoxed(&stack);
      return stack[0].toTensor();
    } catch (const std::exception& e) {
      onednn_failed.store(true);
      TORCH_WARN("nftcore_native::score_logits_forward: the oneDNN GEMM failed (", e.what(),
                 "); using at::mm from now on");
    }
  }
  return at::mm(h, w.t());
}

// --------------------------------------------------------------------------------------------------------- op

std::tuple<at::Tensor, at::Tensor> score_logits_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                        const at::Tensor& token_ids, bool full, int64_t chunk_rows) {
  const char* op = "nftcore_native::score_logits_forward";
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": hidden must be [M, H] and weight [V, H]");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && token_ids.device().is_cpu(), op,
              ": native kernels take CPU tensors");
  TORCH_CHECK(is_native_float(hidden.scalar_type()) && is_native_float(weight.scalar_type()), op,
              ": hidden and weight must be float32, bfloat16 or float16");
  TORCH_CHECK(weight.size(0) == 0 || weight.stride(1) == 1, op, ": weight must have unit stride along H");
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.numel() >= 1, op, ": token_ids must be a non-empty 1-D tensor");
  TORCH_CHECK(token_ids.scalar_type() == at::kLong || token_ids.scalar_type() == at::kInt, op,
              ": token_ids must be int64 or int32");
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0), K = token_ids.numel();
  TORCH_CHECK(weight.size(1) == H, op, ": hidden is [M, H] with H = ", H, " but weight has H = ", weight.size(1));
  const at::Tensor ids = token_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {  // the public op checked them; this keeps a direct call from reading out of bounds
    TORCH_CHECK(id[k] >= 0 && id[k] < V, op, ": token id ", id[k], " is outside [0, ", V, ")");
  }

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor out = at::empty({M, K}, f32);
  at::Tensor lse = at::empty({M}, f32);
  if (M == 0) return {out, lse};
  const at::Tensor h = hidden.to(at::kFloat).contiguous();  // [M, H] is small; a no-op for contiguous fp32
  const float* hp = h.const_data_ptr<float>();
  float* z = out.mutable_data_ptr<float>();  // the selected logits first, then z − lse in place
  float* lp = lse.mutable_data_ptr<float>();
  dispatch_float(weight.scalar_type(), op, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    selected_logits<TW>(hp, M, H, weight, id, K, z);
  });

  if (!full) {
    for (int64_t m = 0; m < M; ++m) lp[m] = logsumexp(z + m * K, K);
  } else {
    const int64_t rows = std::max<int64_t>(1, std::min(chunk_rows, V));
    const bool onednn = use_onednn();
    std::vector<float> run_max(M, -std::numeric_limits<float>::infinity()), run_sum(M, 0.0f);
    at::Tensor stage;  // fp32 [rows, H] for a 16-bit head, reused by every chunk
    if (weight.scalar_type() != at::kFloat) stage = at::empty({rows, H}, f32);
    for (int64_t v0 = 0; v0 < V; v0 += rows) {
      const int64_t c = std::min(rows, V - v0);
      at::Tensor w_c;
      if (weight.scalar_type() == at::kFloat) {
        w_c = weight.narrow(0, v0, c);
      } else {
        dispatch_float(weight.scalar_type(), op, [&](auto tag) {
          using TW = typename decltype(tag)::type;
          stage_rows<TW>(weight, v0, c, stage.mutable_data_ptr<float>());
        });
        w_c = stage.narrow(0, 0, c);
      }
      const at::Tensor logits = chunk_logits(h, w_c, onednn).contiguous();  // [M, c] fp32
      const float* zc = logits.const_data_ptr<float>();
      const int64_t grain = std::max<int64_t>(1, kMinParallelElems / c);
      at::parallel_for(0, M, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m) {
          const float* row = zc + m * c;
          const float m_old = run_max[m];
          const float cmax = row_max(row, c);
          const float m_new = cmax > m_old ? cmax : m_old;
          // exp(−inf − m_new) = 0 on the first chunk; std::exp here: once per row and chunk, exact handling of ±inf.
          run_sum[m] = run_sum[m] * std::exp(m_old - m_new) + row_sum_exp(row, c, m_new);
          run_max[m] = m_new;
        }
      });
    }
    for (int64_t m = 0; m < M; ++m) lp[m] = run_max[m] + std::log(run_sum[m]);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) z[m * K + k] -= lp[m];
  }
  return {out, lse};
}

}  // namespace

// Which GEMM full mode uses now ("onednn" or "aten"), for nftcore.info and the benchmarks.
std::string score_logits_gemm() {
  return use_onednn() ? "oneDNN (mkldnn::_linear_pointwise) for chunks of >= 4M multiply-adds, at::mm below"
                      : "at::mm (MKL or the BLAS torch was built with)";
}

TORCH_LIBRARY_FRAGMENT(nftcore_native, m) {
  m.def(
      "score_logits_forward(Tensor hidden, Tensor weight, Tensor token_ids, bool full, int chunk_rows) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nftcore_native, CPU, m) { m.impl("score_logits_forward", &score_logits_forward); }

}  // namespace nftcore_native
