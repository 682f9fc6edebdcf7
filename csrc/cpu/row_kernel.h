// Pieces shared by the row-wise CPU kernels (logprobs.cpp, kl.cpp, ppo_loss.cpp):
//   * kNaN / kNegInf;
//   * kLanes-wide accumulators reduced in a fixed pairwise order (lanes_sum / lanes_max), so that a row's result
//     depends only on its length, never on alignment, batch or thread count (batch invariance);
//   * grain_rows: the rows-per-task rule for at::parallel_for (one row is always handled by one thread);
//   * run_rows<Kernel>: calls the AVX-512, AVX2+FMA or generic instantiation of a kernel, chosen at run time.
//
// Like vec_math.h, include this after the floating-point pragmas of the including file (fp-contract off,
// no-trapping-math), so that the kernels instantiated here are compiled under them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "vec_math.h"

namespace rlhf_cpu {

constexpr int kLanes = 32;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();  // independent accumulators per row (2 zmm / 4 ymm registers)

// Fixed-order pairwise reductions of kLanes values (order independent of everything but kLanes); lanes_sum
// serves fp32 and fp64 lanes.
template <typename T>
RLHF_INLINE T lanes_sum(T* v) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) v[j] += v[j + w];
  return v[0];
}
RLHF_INLINE float lanes_max(float* v) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) v[j] = v[j + w] > v[j] ? v[j + w] : v[j];
  return v[0];
}

// Rows per parallel task: at least ~32k elements of work per task.
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

// ---------------------------------------------------------------------------------------------------------
// ISA variants. Kernel is a type with
//   template <bool kFma> static RLHF_INLINE void rows(const Args& a, int64_t r0, int64_t r1);
// processing rows [r0, r1). Its body is always-inline, so each wrapper below gets its own copy, vectorised for
// the wrapper's target (see vec_math.h); run_rows picks the wrapper for this machine.
#if RLHF_X86_MULTIVERSION
template <typename Kernel, typename Args>
RLHF_TARGET_AVX512 void rows_avx512(const Args& a, int64_t r0, int64_t r1) {
  Kernel::template rows<true>(a, r0, r1);
}
template <typename Kernel, typename Args>
RLHF_TARGET_AVX2 void rows_avx2(const Args& a, int64_t r0, int64_t r1) {
  Kernel::template rows<true>(a, r0, r1);
}
#endif
template <typename Kernel, typename Args>
void rows_generic(const Args& a, int64_t r0, int64_t r1) {
  Kernel::template rows<false>(a, r0, r1);
}

template <typename Kernel, typename Args>
void run_rows(const Args& a, int64_t r0, int64_t r1) {
#if RLHF_X86_MULTIVERSION
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return rows_avx512<Kernel>(a, r0, r1);
    case CpuIsa::kAvx2: return rows_avx2<Kernel>(a, r0, r1);
    default: break;
  }
#endif
  rows_generic<Kernel>(a, r0, r1);
}

}  // namespace rlhf_cpu
