// CPU implementation of kl_fwd / kl_bwd (contracts in the op table, rlhf_kernels/_registry.py).
//
// Per row, z = float(logits) * inv_temperature (policy) and w = float(ref_logits) * inv_temperature (reference).
// The distribution that weights the sum is a, the other one b: (a, b) = (z, w) for reverse (KL(p || q)), else
// (w, z) (KL(q || p)). With m_a = max a, s_a = sum exp(a - m_a), and m_b, s_b likewise:
//   KL = sum_v softmax(a)_v (log softmax(a)_v - log softmax(b)_v) = t / s_a + (log s_b - log s_a),
//   t  = sum_v exp(a_v - m_a) ((a_v - m_a) - (b_v - m_b)),
// so neither log-sum-exp m + log s is ever formed (it would cost ulp(|m + log s|) in every term for large
// logits). Identical rows go through identical arithmetic: every difference is exactly 0 and s_a == s_b, so
// KL is exactly 0 (and so is the gradient below).
//   backward: lp = (z - row_max) - log_norm, lq = (w - ref_row_max) - ref_log_norm, p = exp(lp),
//             dKL/dz = p ((lp - lq) - KL) for reverse, p - exp(lq) otherwise; dlogits = g_kl dKL/dz * inv_t.
//
// Layout of the work (as in logprobs.cpp):
//   * rows are distributed over threads with at::parallel_for, one row always on one thread, with a reduction
//     order that depends only on V: a row's results do not depend on its batch or the thread count;
//   * the forward reads both rows once, side by side, in blocks of kBlock elements: it converts and scales a
//     block of each into L1 buffers while taking the two block maxima, moves the running maxima (online
//     softmax: with da = m_a - m_a' <= 0 and db = m_b - m_b' <= 0, s_a *= e^da, s_b *= e^db and
//     t = e^da (t + (da - db) s_a)), then sums the block's terms of s_a, s_b and t in kLanes independent lanes
//     (added to the running sums once per block) while the next block of both rows is prefetched;
//   * the backward reads both rows once and writes the gradient once;
//   * each kernel is instantiated per pair of element types (fp32 / bf16 / fp16 each) and per ISA
//     (row_kernel.h, vec_math.h).
//
// Non-finite rows: kl is NaN as soon as one element of either row is NaN or +-inf (or overflows when scaled by
// inv_temperature). This is tested per element (x - x is 0 only for finite x), because NaN propagation alone
// misses a -inf in b (it gives t = +inf). The statistics of such rows are whatever the arithmetic gives.
// Masked-out rows (mask[r] == false) are not read: all five outputs are 0 and the gradient row is 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

// Same floating-point code generation as logprobs.cpp (see there): no implicit FMA contraction, so that z and w
// round identically wherever they are computed; no-trapping-math, so that the selects of exp_f32 vectorise.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include "row_kernel.h"
#include "vec_math.h"

namespace rlhf_cpu {
namespace {

constexpr int64_t kBlock = 2048;  // elements per online-max block and row (2 x 8 KiB of fp32 buffers)
static_assert(kBlock % kLanes == 0, "kBlock must be a multiple of kLanes");

// Rows of a (B, T, V) tensor with stride(2) == 1; row r = (r / T, r % T), 64-bit offsets.
template <typename T>
struct Rows {
  const T* data;
  int64_t T_, stride0, stride1;
  RLHF_INLINE const T* row(int64_t r) const { return data + (r / T_) * stride0 + (r % T_) * stride1; }
};

struct PairStats {
  float m_a, s_a;  // max of a, sum exp(a - m_a)
  float m_b, s_b;  // same for b
  float t;         // sum exp(a - m_a) ((a - m_a) - (b - m_b))
  bool finite;     // every element of both rows is finite
};

// One pass over a row pair (a weights the sum), online maxima rescaled per block.
template <typename TA, typename TB, bool kFma>
RLHF_INLINE PairStats row_pair_stats(const TA* __restrict xa, const TB* __restrict xb, int64_t V, float inv_t) {
  alignas(64) float za[kBlock], zb[kBlock];  // the scaled block of each row, so the second sweep skips the convert
  float sa[kLanes], sb[kLanes], t[kLanes], nf[kLanes];
  for (int j = 0; j < kLanes; ++j) sa[j] = sb[j] = t[j] = nf[j] = 0.0f;
  float ma = kNegInf, mb = kNegInf;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const TA* __restrict pa = xa + b0;
    const TB* __restrict pb = xb + b0;
    const int64_t n = std::min(kBlock, V - b0);
    const int64_t nv = n - n % kLanes;  // full lane groups; the rest (< kLanes) goes lane by lane

    // 1. Scale both blocks into the buffers, take their maxima, and sum x - x (0, or NaN after a non-finite x).
    float mxa[kLanes], mxb[kLanes];
    for (int j = 0; j < kLanes; ++j) mxa[j] = mxb[j] = kNegInf;
    for (int64_t i = 0; i < nv; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float a = to_float(pa[i + j]) * inv_t, b = to_float(pb[i + j]) * inv_t;
        za[i + j] = a;
        zb[i + j] = b;
        mxa[j] = a > mxa[j] ? a : mxa[j];
        mxb[j] = b > mxb[j] ? b : mxb[j];
        nf[j] += (a - a) + (b - b);
      }
    for (int64_t i = nv; i < n; ++i) {
      const float a = to_float(pa[i]) * inv_t, b = to_float(pb[i]) * inv_t;
      const int j = static_cast<int>(i - nv);
      za[i] = a;
      zb[i] = b;
      mxa[j] = a > mxa[j] ? a : mxa[j];
      mxb[j] = b > mxb[j] ? b : mxb[j];
      nf[j] += (a - a) + (b - b);
    }
    const float bma = lanes_max(mxa), bmb = lanes_max(mxb);

    // 2. Move the running maxima. Before anything finite was accumulated (a maximum still -inf) the sums are 0,
    //    or belong to a non-finite row, so the rescale (which would compute 0 * inf) is skipped.
    if (bma > ma || bmb > mb) {
      const float na = bma > ma ? bma : ma, nb = bmb > mb ? bmb : mb;
      if (ma != kNegInf && mb != kNegInf) {
        const float da = ma - na, db = mb - nb;
        const float ea = exp_f32<kFma, false>(da), eb = exp_f32<kFma, false>(db);
        const float dd = da - db;
        for (int j = 0; j < kLanes; ++j) {
          t[j] = ea * madd<kFma>(sa[j], dd, t[j]);
          sa[j] *= ea;
          sb[j] *= eb;
        }
      }
      ma = na;
      mb = nb;
    }

    // 3. Accumulate the block (da, db <= 0) into fresh lane sums, added to the running ones at the end: each
    //    running sum then takes V / kBlock additions instead of V / kLanes, so far fewer small terms are lost to
    //    rounding on long rows. The next block of both rows is prefetched meanwhile (past a row's end the
    //    prefetch is harmless, and often the start of the next row).
    float bsa[kLanes], bsb[kLanes], bt[kLanes];
    for (int j = 0; j < kLanes; ++j) bsa[j] = bsb[j] = bt[j] = 0.0f;
    const float* __restrict qa = za;
    const float* __restrict qb = zb;
    for (int64_t i = 0; i < nv; i += kLanes) {
      prefetch_range(pa + i, kBlock * sizeof(TA), kLanes * sizeof(TA));
      prefetch_range(pb + i, kBlock * sizeof(TB), kLanes * sizeof(TB));
      for (int j = 0; j < kLanes; ++j) {
        const float da = qa[i + j] - ma, db = qb[i + j] - mb;
        const float ea = exp_f32<kFma, false>(da), eb = exp_f32<kFma, false>(db);
        bsa[j] += ea;
        bsb[j] += eb;
        bt[j] = madd<kFma>(ea, da - db, bt[j]);
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      const int j = static_cast<int>(i - nv);
      const float da = za[i] - ma, db = zb[i] - mb;
      const float ea = exp_f32<kFma, false>(da), eb = exp_f32<kFma, false>(db);
      bsa[j] += ea;
      bsb[j] += eb;
      bt[j] = madd<kFma>(ea, da - db, bt[j]);
    }
    for (int j = 0; j < kLanes; ++j) {
      sa[j] += bsa[j];
      sb[j] += bsb[j];
      t[j] += bt[j];
    }
  }
  return {ma, lanes_sum(sa), mb, lanes_sum(sb), lanes_sum(t), lanes_sum(nf) == 0.0f};
}

template <typename TA, typename TB>
struct FwdArgs {
  Rows<TA> a;  // the rows that weight the sum: logits for reverse, else ref_logits
  Rows<TB> b;
  int64_t V;
  float inv_t;
  const bool* mask;  // nullptr: every row
  float* kl;
  float *max_a, *log_norm_a, *max_b, *log_norm_b;  // the statistics outputs of a and of b
};

template <typename TA, typename TB>
struct KlFwd {
  template <bool kFma>
  static RLHF_INLINE void rows(const FwdArgs<TA, TB>& a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (a.mask != nullptr && !a.mask[r]) {
        a.kl[r] = a.max_a[r] = a.log_norm_a[r] = a.max_b[r] = a.log_norm_b[r] = 0.0f;
        continue;
      }
      const PairStats st = row_pair_stats<TA, TB, kFma>(a.a.row(r), a.b.row(r), a.V, a.inv_t);
      const float log_sa = std::log(st.s_a), log_sb = std::log(st.s_b);
      const float raw = st.t / st.s_a + (log_sb - log_sa);
      a.kl[r] = st.finite ? (raw < 0.0f ? 0.0f : raw) : kNaN;  // (clamps rounding negatives; keeps NaN)
      a.max_a[r] = st.m_a;
      a.log_norm_a[r] = log_sa;
      a.max_b[r] = st.m_b;
      a.log_norm_b[r] = log_sb;
    }
  }
};

template <typename TZ, typename TW>
struct BwdArgs {
  Rows<TZ> z;  // logits
  Rows<TW> w;  // ref_logits
  int64_t V;
  float inv_t;
  bool reverse;
  const bool* mask;  // nullptr: every row
  const float *grad_kl, *row_max, *log_norm, *ref_row_max, *ref_log_norm, *kl;
  TZ* grad;  // (N, V) contiguous
};

template <typename TZ, typename TW>
struct KlBwd {
  template <bool kFma>
  static RLHF_INLINE void rows(const BwdArgs<TZ, TW>& a, int64_t r0, int64_t r1) {
    const int64_t V = a.V;
    const float inv_t = a.inv_t;
    for (int64_t r = r0; r < r1; ++r) {
      TZ* __restrict g = a.grad + r * V;
      if (a.mask != nullptr && !a.mask[r]) {
        std::memset(static_cast<void*>(g), 0, sizeof(TZ) * V);  // all-zero bits are +0 in every dtype
        continue;
      }
      const TZ* __restrict x = a.z.row(r);
      const TW* __restrict y = a.w.row(r);
      const float mz = a.row_max[r], lz = a.log_norm[r], mw = a.ref_row_max[r], lw = a.ref_log_norm[r];
      const float gk = a.grad_kl[r], kl = a.kl[r];
      if (a.reverse) {
        for (int64_t i = 0; i < V; ++i) {
          const float lp = (to_float(x[i]) * inv_t - mz) - lz;
          const float lq = (to_float(y[i]) * inv_t - mw) - lw;
          g[i] = from_float<TZ>(gk * exp_f32<kFma>(lp) * ((lp - lq) - kl) * inv_t);
        }
      } else {
        for (int64_t i = 0; i < V; ++i) {
          const float lp = (to_float(x[i]) * inv_t - mz) - lz;
          const float lq = (to_float(y[i]) * inv_t - mw) - lw;
          g[i] = from_float<TZ>(gk * (exp_f32<kFma>(lp) - exp_f32<kFma>(lq)) * inv_t);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Dtype dispatch: body(A{}, B{}) with A, B the element types of da, db, so that the 3 x 3 combinations of
// float32 / bfloat16 / float16 are all generated from the one generic lambda.
#define RLHF_KL_FLOAT_CASES(...) \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__)

template <typename Body>
void dispatch_float_pair(at::ScalarType da, at::ScalarType db, const Body& body) {
  AT_DISPATCH_SWITCH(da, "kl_cpu", RLHF_KL_FLOAT_CASES([&] {
                       using A = scalar_t;
                       AT_DISPATCH_SWITCH(db, "kl_cpu", RLHF_KL_FLOAT_CASES([&] { body(A{}, scalar_t{}); }));
                     }));
}

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {x.data_ptr<T>(), x.size(1), x.stride(0), x.stride(1)};
}

// ---------------------------------------------------------------------------------------------------------
// Input checks (shared by forward and backward).
void check_logits(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be 3-D (B, T, V), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt,
              " (cast it, or use the PyTorch reference for float64)");
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, op, ": ", name,
              " must be contiguous along the vocabulary dimension (stride(2) == 1), got strides ", x.strides(),
              "; call .contiguous() on it");
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& ref_logits,
                  const std::optional<at::Tensor>& mask) {
  check_logits(op, "logits", logits);
  check_logits(op, "ref_logits", ref_logits);
  const int64_t V = logits.size(2), N = logits.size(0) * logits.size(1);
  TORCH_CHECK(ref_logits.size(2) == V, op, ": logits and ref_logits must have the same vocabulary size (size(2)), got ",
              logits.sizes(), " and ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.size(0) * ref_logits.size(1) == N, op,
              ": logits and ref_logits must hold the same number of rows (size(0) * size(1)), got ", logits.sizes(),
              " and ", ref_logits.sizes());
  TORCH_CHECK(V >= 1 || N == 0, op, ": the vocabulary dimension (size(2)) must be >= 1");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == logits.device(), op, ": mask must be on the same device as logits (", logits.device(),
                "), got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == N, op, ": mask must have shape (N,) = (", N,
                ",) with N = logits.size(0) * logits.size(1), got ", m.sizes());
    TORCH_CHECK(m.is_contiguous(), op, ": mask must be contiguous, got strides ", m.strides(),
                "; call .contiguous() on it");
  }
}

// A per-row fp32 input of kl_bwd; returned contiguous (it may arrive expanded, e.g. from autograd).
at::Tensor row_input(const char* name, const at::Tensor& x, int64_t N) {
  TORCH_CHECK(x.device().is_cpu(), "kl_bwd: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "kl_bwd: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == N, "kl_bwd: ", name, " must have shape (N,) = (", N, ",), got ", x.sizes());
  return x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd_cpu(const at::Tensor& logits,
                                                                                  const at::Tensor& ref_logits,
                                                                                  const std::optional<at::Tensor>& mask,
                                                                                  double inv_temperature,
                                                                                  bool reverse) {
  check_inputs("kl_fwd", logits, ref_logits, mask);
  const int64_t V = logits.size(2), N = logits.size(0) * logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, opts), row_max = at::empty({N}, opts), log_norm = at::empty({N}, opts),
             ref_row_max = at::empty({N}, opts), ref_log_norm = at::empty({N}, opts);
  if (N == 0) return {kl, row_max, log_norm, ref_row_max, ref_log_norm};
  // a (the weighting distribution) is the policy for reverse, the reference otherwise.
  const at::Tensor& a = reverse ? logits : ref_logits;
  const at::Tensor& b = reverse ? ref_logits : logits;
  float *max_a = row_max.data_ptr<float>(), *log_norm_a = log_norm.data_ptr<float>();
  float *max_b = ref_row_max.data_ptr<float>(), *log_norm_b = ref_log_norm.data_ptr<float>();
  if (!reverse) {
    std::swap(max_a, max_b);
    std::swap(log_norm_a, log_norm_b);
  }
  float* kl_out = kl.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  dispatch_float_pair(a.scalar_type(), b.scalar_type(), [&](auto ta, auto tb) {
    using TA = decltype(ta);
    using TB = decltype(tb);
    const FwdArgs<TA, TB> args{rows_of<TA>(a), rows_of<TB>(b), V,          inv_t, m,
                               kl_out,         max_a,          log_norm_a, max_b, log_norm_b};
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) { run_rows<KlFwd<TA, TB>>(args, r0, r1); });
  });
  return {kl, row_max, log_norm, ref_row_max, ref_log_norm};
}

at::Tensor kl_bwd_cpu(const at::Tensor& logits, const at::Tensor& ref_logits, const std::optional<at::Tensor>& mask,
                      const at::Tensor& grad_kl_in, const at::Tensor& row_max_in, const at::Tensor& log_norm_in,
                      const at::Tensor& ref_row_max_in, const at::Tensor& ref_log_norm_in, const at::Tensor& kl_in,
                      double inv_temperature, bool reverse) {
  check_inputs("kl_bwd", logits, ref_logits, mask);
  const int64_t V = logits.size(2), N = logits.size(0) * logits.size(1);
  const at::Tensor grad_kl = row_input("grad_kl", grad_kl_in, N), row_max = row_input("row_max", row_max_in, N),
                   log_norm = row_input("log_norm", log_norm_in, N),
                   ref_row_max = row_input("ref_row_max", ref_row_max_in, N),
                   ref_log_norm = row_input("ref_log_norm", ref_log_norm_in, N), kl = row_input("kl", kl_in, N);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous, logits dtype
  if (N == 0) return grad;
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  dispatch_float_pair(logits.scalar_type(), ref_logits.scalar_type(), [&](auto tz, auto tw) {
    using TZ = decltype(tz);
    using TW = decltype(tw);
    const BwdArgs<TZ, TW> args{rows_of<TZ>(logits),
                               rows_of<TW>(ref_logits),
                               V,
                               static_cast<float>(inv_temperature),
                               reverse,
                               m,
                               grad_kl.data_ptr<float>(),
                               row_max.data_ptr<float>(),
                               log_norm.data_ptr<float>(),
                               ref_row_max.data_ptr<float>(),
                               ref_log_norm.data_ptr<float>(),
                               kl.data_ptr<float>(),
                               grad.data_ptr<TZ>()};
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) { run_rows<KlBwd<TZ, TW>>(args, r0, r1); });
  });
  return grad;
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("kl_fwd", &rlhf_cpu::kl_fwd_cpu);
  m.impl("kl_bwd", &rlhf_cpu::kl_bwd_cpu);
}
