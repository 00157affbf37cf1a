// Shared helpers of nftcore's native CPU kernels: element loads/stores in fp32, the dtype switch, a fixed-order lane
// sum and a vectorisable exp. Light headers only (no <torch/extension.h>): a kernel file compiles in seconds.
//
// Reproducibility rules every kernel here follows:
// - fp32 arithmetic, elements loaded as fp32 right away (bf16/fp16 are exact in fp32), results rounded once on store
//   with round-to-nearest-even (what `tensor.to(dtype)` does);
// - reductions split the data into fixed-size pieces that do not depend on the thread count, each piece summed in
//   kLanes interleaved fp32 accumulators combined by a fixed tree, the pieces combined in index order: the result is
//   bit-identical for any number of threads and for any vector width the compiler picks;
// - no FMA contraction (-ffp-contract=off in CMakeLists.txt), so an expression rounds like the reference's ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

// Hot row loops (block_ops.cpp, rms_norm.cpp) are compiled for the baseline and, with GCC on x86-64 Linux, also for
// AVX2 and AVX-512F; the loader picks the widest the CPU has (an ifunc, resolved once). Same source, same operation
// order, no FMA (-ffp-contract=off holds in every clone), fixed kLanes accumulators: every clone gives the same bits,
// only the vector width differs - 16-bit loads/stores are where it pays (SSE2 has no 32 -> 16 bit pack).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(NFTCORE_NO_CLONES)
#define NFTCORE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NFTCORE_CLONES
#endif

namespace nftcore_native {

// Accumulator lanes: 16 fp32 = one AVX-512 register, two AVX2 or four SSE2 ones. Fixed, so sums do not depend on the
// ISA; GCC vectorises the `for (j < kLanes)` loops below at the x86-64 baseline (checked with -fopt-info-vec).
constexpr int kLanes = 16;

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Element traits: `storage` is what the tensor holds, load() widens to fp32, store() rounds fp32 to the storage type.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using storage = float;
  static float load(float x) { return x; }
  static float store(float v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  using storage = uint16_t;  // raw bits: keeps the loops free of class types, so they vectorise
  static float load(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }
  static uint16_t store(float v) {
    const uint32_t b = float_to_bits(v);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;  // round half to even on the 16 dropped bits
    return v != v ? uint16_t(0x7FC0) : uint16_t(rounded);             // NaN stays a (quiet) NaN
  }
};

template <>
struct Elem<c10::Half> {
  using storage = uint16_t;
  static float load(uint16_t x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static uint16_t store(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
};

template <typename T>
inline const typename Elem<T>::storage* cdata(const at::Tensor& t) {
  return reinterpret_cast<const typename Elem<T>::storage*>(t.const_data_ptr());
}

template <typename T>
inline typename Elem<T>::storage* mdata(const at::Tensor& t) {  // the handle is const, the data is not
  return reinterpret_cast<typename Elem<T>::storage*>(t.mutable_data_ptr());
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the kernel's element type: fp32, bf16 or fp16 (fp64 never reaches a native kernel: the Python
// side hands it to the reference and records the fallback).
template <typename F>
inline void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kBFloat16:
      f(Tag<c10::BFloat16>{});
      break;
    case at::kHalf:
      f(Tag<c10::Half>{});
      break;
    default:
      TORCH_CHECK(false, op, ": native kernels take float32, bfloat16 or float16, got ", st);
  }
}

inline bool is_native_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

// Fixed-order tree over the lanes: (0+8, 1+9, ...), then 4, 2, 1.
inline float lane_sum(float* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

inline float lane_max(float* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] = acc[j + w] > acc[j] ? acc[j + w] : acc[j];
  }
  return acc[0];
}

// exp(x) in fp32, branch-free so that loops over it vectorise at the SSE2 baseline (std::exp does not: it is a libm
// call). Cephes' expf: x = n·ln2 + f with |f| <= ln2/2 (Cody-Waite split of ln2), a degree-6 polynomial for e^f,
// 2^n built in the exponent bits. Max error ~2 ulp over [-87, 88]; below -87.3 (where exp underflows into denormals)
// it returns exactly 0, above 88.3 +inf; NaN in, NaN out.
inline float exp_fast(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  const float xc = x > hi ? hi : (x < lo ? lo : x);  // NaN compares false both ways and passes through
  const float magic = 12582912.0f;                    // 1.5·2^23: adding it rounds to an integer (round to nearest)
  const float nf = (xc * 1.44269504088896341f + magic) - magic;
  const float f = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  const float z = f * f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * z + f + 1.0f;
  const int32_t n = static_cast<int32_t>(nf);  // exact: nf is an integer in [-126, 128]
  const float scale = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

}  // namespace nftcore_native
