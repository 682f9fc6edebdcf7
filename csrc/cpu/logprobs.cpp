// CPU implementation of logprobs_fwd / logprobs_bwd (contracts in the op table, rlhf_kernels/_registry.py).
//
// Per row x (V logits) with z = float(x) * inv_temperature:
//   forward:  m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m)
//             row_max = m, log_norm = log s, entropy = log s - t / s, logprob = (z[label] - m) - log s
//   backward: lp = (z - m) - log_norm, p = exp(lp), dz = -p (g_lp + g_H (lp + H)) + [v == label] g_lp,
//             dlogits = dz / T
// The log-sum-exp m + log s is never formed: rounding it to fp32 would cost ulp(|m + log s|) of absolute
// error in every log-prob and in every p of the backward (large when the logits are large, e.g. ~300).
// Subtracting m first keeps z - m exact near the top of the row, so only the small log s is rounded in.
//
// Layout of the work:
//   * rows are distributed over threads with at::parallel_for; one row is always processed by one thread
//     with a reduction order that depends only on V, so a row's results are bitwise identical whatever the
//     batch it is in or the number of threads (batch invariance);
//   * the forward reads each row once from memory: it walks the row in blocks of kBlock elements, converts
//     and scales a block into an L1 buffer while taking its max, rescales the running (s, t) if the max grew
//     (online softmax), then accumulates exp and exp * (z - m) over the buffer in kLanes independent fp32
//     lanes, prefetching the next block meanwhile;
//   * the backward reads the row once and writes the gradient once;
//   * the inner loops are plain C++ over kLanes-wide arrays that the compiler vectorises; each kernel is
//     instantiated per ISA (AVX-512 / AVX2+FMA / generic) and chosen at run time (row_kernel.h, vec_math.h).
//
// Non-finite rows: a NaN or +-inf logit makes t NaN (NaN propagates; -inf gives exp(..) = 0 times -inf; +inf
// gives inf - inf), and the row's logprob and entropy are then NaN. Ignored rows (label == ignore_index) are
// not read and give exactly 0 for all four outputs and a zero gradient (the op table's convention); a label
// outside [0, V) gives a NaN logprob and no one-hot gradient term (never an out-of-bounds access).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

// Floating-point code generation for the kernels below (results do not depend on the optimiser):
//  * no implicit fused multiply-add: z = x * inv_temperature must round the same way wherever it is computed
//    (block max, accumulation, label pick, backward), otherwise e.g. a one-element row gets a logprob of
//    (rounding error of z) instead of exactly 0. Explicit FMAs (madd<true>) are unaffected;
//  * no-trapping-math (as torch itself is built): lets GCC if-convert the range selects of exp_f32 by
//    computing both sides; without it only the AVX-512 variant (masked instructions) vectorises.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include "row_kernel.h"
#include "vec_math.h"

namespace rlhf_cpu {
namespace {

constexpr int64_t kBlock = 2048;  // elements per online-max block; a multiple of kLanes
static_assert(kBlock % kLanes == 0, "kBlock must be a multiple of kLanes");

struct RowStats {
  float m;  // max of z (NaNs are skipped by the max; they poison s and t instead)
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * (z - m)
};

// One pass over a row: online max with per-block rescaling of the lane accumulators.
template <typename T, bool kFma>
RLHF_INLINE RowStats row_stats(const T* __restrict x, int64_t V, float inv_t) {
  alignas(64) float zb[kBlock];  // z of the current block, so the second sweep skips convert + scale
  float s[kLanes], t[kLanes];
  for (int j = 0; j < kLanes; ++j) s[j] = t[j] = 0.0f;
  float m = kNegInf;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const T* __restrict xb = x + b0;
    const int64_t n = std::min(kBlock, V - b0);
    const int64_t nv = n - n % kLanes;  // full lane groups; the rest (< kLanes) goes lane by lane

    // 1. z = x * inv_t into zb, and the block max.
    float mx[kLanes];
    for (int j = 0; j < kLanes; ++j) mx[j] = kNegInf;
    for (int64_t i = 0; i < nv; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float z = to_float(xb[i + j]) * inv_t;
        zb[i + j] = z;
        mx[j] = z > mx[j] ? z : mx[j];
      }
    for (int64_t i = nv; i < n; ++i) {
      const float z = to_float(xb[i]) * inv_t;
      zb[i] = z;
      mx[i - nv] = z > mx[i - nv] ? z : mx[i - nv];
    }
    const float bm = lanes_max(mx);

    // 2. Move the running max to bm: s' = a s, t' = a (t + s d) with d = m - bm, a = exp(d). While m is
    //    still -inf nothing finite has been accumulated (s = t = 0, or NaN from a -inf / NaN block, which
    //    must stay NaN), so the rescale is skipped rather than computing 0 * -inf.
    if (bm > m) {
      if (m != kNegInf) {
        const float d = m - bm;
        const float a = exp_f32<kFma, false>(d);
        for (int j = 0; j < kLanes; ++j) {
          t[j] = a * madd<kFma>(s[j], d, t[j]);
          s[j] *= a;
        }
      }
      m = bm;
    }

    // 3. Accumulate. d = z - m <= 0, or NaN (-inf / +inf / NaN logits turn t into NaN). The next block is
    //    prefetched meanwhile, so its memory traffic overlaps this block's exp work (past the row's end the
    //    prefetch is harmless, and usually the start of the next row).
    const float* __restrict zp = zb;  // (a restrict view keeps s and t in registers across the loop)
    for (int64_t i = 0; i < nv; i += kLanes) {
      prefetch_range(xb + i, kBlock * sizeof(T), kLanes * sizeof(T));
      for (int j = 0; j < kLanes; ++j) {
        const float d = zp[i + j] - m;
        const float e = exp_f32<kFma, false>(d);
        s[j] += e;
        t[j] = madd<kFma>(e, d, t[j]);
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      const float d = zb[i] - m;
      const float e = exp_f32<kFma, false>(d);
      s[i - nv] += e;
      t[i - nv] = madd<kFma>(e, d, t[i - nv]);
    }
  }
  return {m, lanes_sum(s), lanes_sum(t)};
}

template <typename T>
struct FwdArgs {
  const T* logits;
  int64_t T_, V, stride0, stride1;
  const int64_t* labels;
  float inv_t;
  int64_t ignore_index;
  float* logprobs;
  float* entropy;
  float* row_max;
  float* log_norm;
  RLHF_INLINE const T* row(int64_t r) const { return logits + (r / T_) * stride0 + (r % T_) * stride1; }
};

template <typename T, bool kFma>
RLHF_INLINE void fwd_rows(const FwdArgs<T>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t label = a.labels[r];
    if (label == a.ignore_index) {
      a.logprobs[r] = 0.0f;
      a.entropy[r] = 0.0f;
      a.row_max[r] = 0.0f;
      a.log_norm[r] = 0.0f;
      continue;
    }
    const T* x = a.row(r);
    const RowStats st = row_stats<T, kFma>(x, a.V, a.inv_t);
    const float log_s = std::log(st.s);
    const bool bad = st.t != st.t;  // t is NaN: a non-finite logit in the row
    const bool valid = label >= 0 && label < a.V;
    a.row_max[r] = st.m;
    a.log_norm[r] = log_s;
    a.entropy[r] = bad ? kNaN : log_s - st.t / st.s;
    a.logprobs[r] = (bad || !valid) ? kNaN : (to_float(x[valid ? label : 0]) * a.inv_t - st.m) - log_s;
  }
}

template <typename T>
struct BwdArgs {
  const T* logits;
  int64_t T_, V, stride0, stride1;
  const int64_t* labels;
  const float* grad_logprobs;
  const float* grad_entropy;
  const float* row_max;
  const float* log_norm;
  const float* entropy;
  float inv_t;
  int64_t ignore_index;
  T* grad;  // (N, V) contiguous
  RLHF_INLINE const T* row(int64_t r) const { return logits + (r / T_) * stride0 + (r % T_) * stride1; }
};

// dlogits = inv_t * (-p (c + g_H d)) with d = (z - m) - log_norm, p = exp(d), c = g_lp + g_H H; the label
// entry adds inv_t g_lp.
template <typename T, bool kFma>
RLHF_INLINE void bwd_rows(const BwdArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict g = a.grad + r * V;
    const int64_t label = a.labels[r];
    if (label == a.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * V);  // all-zero bits are +0 in every dtype
      continue;
    }
    const T* __restrict x = a.row(r);
    const float inv_t = a.inv_t, m = a.row_max[r], ln = a.log_norm[r];
    const float g_lp = a.grad_logprobs[r], g_h = a.grad_entropy[r];
    const float c = madd<kFma>(g_h, a.entropy[r], g_lp);
    const float neg_inv_t = -inv_t;
    for (int64_t i = 0; i < V; ++i) {
      const float d = (to_float(x[i]) * inv_t - m) - ln;
      const float p = exp_f32<kFma>(d);
      g[i] = from_float<T>(neg_inv_t * p * madd<kFma>(g_h, d, c));
    }
    if (label >= 0 && label < V) {
      const float d = (to_float(x[label]) * inv_t - m) - ln;
      const float p = exp_f32<kFma>(d);
      g[label] = from_float<T>((g_lp - p * madd<kFma>(g_h, d, c)) * inv_t);
    }
  }
}

// Kernel types for run_rows (row_kernel.h), which instantiates fwd_rows / bwd_rows once per ISA.
template <typename T>
struct FwdKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const FwdArgs<T>& a, int64_t r0, int64_t r1) {
    fwd_rows<T, kFma>(a, r0, r1);
  }
};
template <typename T>
struct BwdKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const BwdArgs<T>& a, int64_t r0, int64_t r1) {
    bwd_rows<T, kFma>(a, r0, r1);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Input checks (shared by forward and backward).
void check_logits_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), op,
              ": logits and labels must both be CPU tensors, got ", logits.device(), " and ", labels.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, T, V), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt,
              " (cast the logits, or use the PyTorch reference for float64)");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 1 || B * T == 0, op, ": the vocabulary dimension (logits.size(2)) must be >= 1");
  TORCH_CHECK(V <= 1 || logits.stride(2) == 1, op,
              ": logits must be contiguous along the vocabulary dimension (stride(2) == 1), got strides ",
              logits.strides(), "; call .contiguous() on the logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == T, op,
              ": labels must have shape (B, T) = (", B, ", ", T, ") matching logits ", logits.sizes(), ", got ",
              labels.sizes());
}

void check_row_tensor(const char* op, const char* name, const at::Tensor& x, int64_t B, int64_t T) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T, op, ": ", name, " must have shape (", B, ", ", T,
              "), got ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits,
                                                                            const at::Tensor& labels_in,
                                                                            double inv_temperature,
                                                                            int64_t ignore_index) {
  check_logits_labels("logprobs_fwd", logits, labels_in);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({B, T}, opts), entropy = at::empty({B, T}, opts),
             row_max = at::empty({B, T}, opts), log_norm = at::empty({B, T}, opts);
  if (N == 0) return {logprobs, entropy, row_max, log_norm};
  const at::Tensor labels = labels_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    FwdArgs<scalar_t> a{logits.data_ptr<scalar_t>(),    T, V, logits.stride(0), logits.stride(1),
                        labels.data_ptr<int64_t>(),     static_cast<float>(inv_temperature), ignore_index,
                        logprobs.data_ptr<float>(),     entropy.data_ptr<float>(), row_max.data_ptr<float>(),
                        log_norm.data_ptr<float>()};
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) { run_rows<FwdKernel<scalar_t>>(a, r0, r1); });
  });
  return {logprobs, entropy, row_max, log_norm};
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& grad_logprobs_in,
                            const at::Tensor& grad_entropy_in, const at::Tensor& row_max_in,
                            const at::Tensor& log_norm_in, const at::Tensor& entropy_in, double inv_temperature,
                            int64_t ignore_index) {
  const char* op = "logprobs_bwd";
  check_logits_labels(op, logits, labels_in);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), N = B * T;
  check_row_tensor(op, "grad_logprobs", grad_logprobs_in, B, T);
  check_row_tensor(op, "grad_entropy", grad_entropy_in, B, T);
  check_row_tensor(op, "row_max", row_max_in, B, T);
  check_row_tensor(op, "log_norm", log_norm_in, B, T);
  check_row_tensor(op, "entropy", entropy_in, B, T);
  at::Tensor grad = at::empty({B, T, V}, logits.options());  // contiguous, logits dtype
  if (N == 0 || V == 0) return grad;
  // (B, T) fp32 side inputs may arrive expanded (e.g. from autograd); make them dense.
  const at::Tensor labels = labels_in.contiguous(), g_lp = grad_logprobs_in.contiguous(),
                   g_h = grad_entropy_in.contiguous(), row_max = row_max_in.contiguous(),
                   log_norm = log_norm_in.contiguous(), ent = entropy_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    BwdArgs<scalar_t> a{logits.data_ptr<scalar_t>(), T, V, logits.stride(0), logits.stride(1),
                        labels.data_ptr<int64_t>(),  g_lp.data_ptr<float>(), g_h.data_ptr<float>(),
                        row_max.data_ptr<float>(),   log_norm.data_ptr<float>(), ent.data_ptr<float>(),
                        static_cast<float>(inv_temperature), ignore_index, grad.data_ptr<scalar_t>()};
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) { run_rows<BwdKernel<scalar_t>>(a, r0, r1); });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("logprobs_fwd", &rlhf_cpu::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &rlhf_cpu::logprobs_bwd_cpu);
}
