// Scalar building blocks for the CPU kernels, written so that GCC / clang auto-vectorise the loops that call
// them (no intrinsics, no -march flag needed):
//   * exp_f32:   branch-free fp32 exp (range reduction + polynomial), < 1 ulp on the reduced range;
//   * to_float / from_float: fp32 <-> bf16 / fp16 conversions with integer bit tricks (round to nearest even);
//   * CpuIsa / cpu_isa(): which instruction-set variant of a kernel to run on this machine.
//
// Multiversioning: a kernel body is an always-inline template; thin wrappers carrying RLHF_TARGET_AVX512 /
// RLHF_TARGET_AVX2 (function `target` attributes) instantiate it once per ISA, so the vectoriser emits zmm /
// ymm code inside those wrappers, and cpu_isa() picks the wrapper at run time. Elsewhere (non-x86, MSVC) only
// the generic variant exists.
//
// Includers should compile these with -ffp-contract=off and -fno-trapping-math in effect (logprobs.cpp sets
// both with a pragma before including this header): the range selects of exp_f32 then if-convert for every
// ISA, and no product is silently fused with a following add.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define RLHF_INLINE inline __attribute__((always_inline))
#else
#define RLHF_INLINE inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define RLHF_X86_MULTIVERSION 1
#if defined(__clang__)
#define RLHF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"), min_vector_width(512)))
#else
#define RLHF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#define RLHF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define RLHF_X86_MULTIVERSION 0
#endif

namespace rlhf_cpu {

// ---------------------------------------------------------------------------------------------------------
// Run-time ISA selection. RLHF_KERNELS_CPU_ISA=generic|avx2|avx512 caps the variant (used by the tests to
// exercise every code path on one machine); it can only lower the level the CPU supports.
enum class CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detect_cpu_isa() {
  CpuIsa isa = CpuIsa::kGeneric;
#if RLHF_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = CpuIsa::kAvx2;
  if (isa == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    isa = CpuIsa::kAvx512;
#endif
  if (const char* env = std::getenv("RLHF_KERNELS_CPU_ISA")) {
    CpuIsa cap = isa;
    if (std::strcmp(env, "generic") == 0) cap = CpuIsa::kGeneric;
    else if (std::strcmp(env, "avx2") == 0) cap = CpuIsa::kAvx2;
    if (static_cast<int>(cap) < static_cast<int>(isa)) isa = cap;
  }
  return isa;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

// ---------------------------------------------------------------------------------------------------------
// Bit casts and conversions.
RLHF_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
RLHF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// (The double overloads only let AT_DISPATCH_FLOATING_TYPES instantiate; the ops reject float64 inputs.)
RLHF_INLINE float to_float(float v) { return v; }
RLHF_INLINE float to_float(double v) { return static_cast<float>(v); }
RLHF_INLINE float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
// fp16 -> fp32, exact. Normal halves: rebias the exponent (+112). Inf / NaN: rebias to 255. Subnormals: build
// 2^-14 * (1 + m / 1024) and subtract 2^-14, which leaves m * 2^-24 exactly (no denormal arithmetic).
RLHF_INLINE float to_float(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t o = (em << 13) + (112u << 23);
  o = em >= 0x7c00u ? o + (112u << 23) : o;
  const uint32_t sub = float_to_bits(bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23));
  o = em < 0x0400u ? sub : o;
  return bits_to_float(o | sign);
}

template <typename T>
RLHF_INLINE T from_float(float f);
template <>
RLHF_INLINE float from_float<float>(float f) { return f; }
template <>
RLHF_INLINE double from_float<double>(float f) { return f; }
// fp32 -> bf16, round to nearest even; NaN -> canonical quiet NaN (same as c10::BFloat16(float)).
template <>
RLHF_INLINE c10::BFloat16 from_float<c10::BFloat16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}
// fp32 -> fp16, round to nearest even, all three regimes computed and selected (branch-free):
// overflow -> inf (NaN -> 0x7e00); |f| < 2^-14 -> subnormal, rounded by an fp add against 0.5 whose ulp is
// the fp16 subnormal step 2^-24; otherwise rebias the exponent and round the 13 dropped mantissa bits.
template <>
RLHF_INLINE c10::Half from_float<c10::Half>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t small = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? small : normal);
  return c10::Half(static_cast<uint16_t>(h | sign), c10::Half::from_bits());
}

// Prefetch (for reading) the cache lines of [p + offset, p + offset + bytes). The address is formed as an
// integer, so it may lie past the end of the array: a prefetch never faults.
RLHF_INLINE void prefetch_range(const void* p, int64_t offset, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(offset);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(a + o), 0, 3);
#else
  (void)p;
  (void)offset;
  (void)bytes;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// a * b + c, fused when the variant has FMA (kFma is a compile-time property of the ISA wrapper; the generic
// x86-64 variant must not call fma(), which would be a libm call there).
template <bool kFma>
RLHF_INLINE float madd(float a, float b, float c) {
  if constexpr (kFma) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_fmaf(a, b, c);  // the builtin, not std::fma: always inlined whatever the optimize flags
#else
    return std::fma(a, b, c);
#endif
  } else {
    return a * b + c;
  }
}

// exp(x) in fp32. x = k ln2 + r with k = round(x / ln2), |r| <= ln2 / 2 (Cody-Waite split of ln2, whose high
// part has 9 significant bits so k * kLn2Hi is exact); exp(r) = 1 + r (1 + r P(r)) in Horner form, P of
// degree 4 fitted for minimal relative error on [-ln2/2, ln2/2] (approximation error 3e-9; 0.72 ulp max after
// fp32 rounding with FMA); then scale by 2^k.
// k comes out of one add: x log2e + (1.5 * 2^23 + 127) holds k + 127 in its low mantissa bits, and the low
// 9 bits of 1.5 * 2^23's encoding are zero, so shifting the encoding left by 23 leaves exactly the fp32 2^k
// (no float -> int conversion). Range cases are applied last as selects on the computed value:
//   x < -87.3 (incl. -inf) -> +0 exactly (results stay normal: exp(-87.3) > FLT_MIN);
//   x > 88 -> +inf when kCheckHigh (callers that only pass x <= 0 or NaN skip that check);
//   NaN -> NaN (r inherits it).
template <bool kFma, bool kCheckHigh = true>
RLHF_INLINE float exp_f32(float x) {
  constexpr float kLo = -87.3f, kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12583039.0f;  // 1.5 * 2^23 + 127
  constexpr float kP0 = 4.999999404e-01f, kP1 = 1.666652113e-01f, kP2 = 4.166838899e-02f;
  constexpr float kP3 = 8.368710987e-03f, kP4 = 1.381447422e-03f;
  const float shifted = x * kLog2e + kShift;
  const float kf = shifted - kShift;
  const float scale = bits_to_float(float_to_bits(shifted) << 23);
  float r = madd<kFma>(kf, -kLn2Hi, x);
  r = madd<kFma>(kf, -kLn2Lo, r);
  float p = madd<kFma>(kP4, r, kP3);
  p = madd<kFma>(p, r, kP2);
  p = madd<kFma>(p, r, kP1);
  p = madd<kFma>(p, r, kP0);
  p = madd<kFma>(p, r, 1.0f);
  uint32_t out = float_to_bits(madd<kFma>(p, r, 1.0f) * scale);
  if constexpr (kCheckHigh) out = x > kHi ? 0x7f800000u : out;
  out = x < kLo ? 0u : out;
  return bits_to_float(out);
}

}  // namespace rlhf_cpu
