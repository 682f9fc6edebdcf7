// CPU implementation of gae_fwd (schema in csrc/module.cpp): masked generalised advantage estimation.
//
// Per row, backwards over t with next_value = acc = 0 (fp32):
//   mask[t]:  acc = (r_t + gamma next_value - V_t) + gamma lam acc,  next_value = V_t
//   else:     both carry;      advantages[t] = acc,  returns[t] = acc + V_t
// and, in the same pass, the row's count, mean and M2 (sum of squared deviations from the row mean) of the
// advantages at masked positions, from shifted sums. Whitening over the batch merges these.
//
// On a CPU the recursion is cheapest as it is written: one row per thread (rows split with at::parallel_for),
// one dependent multiply-add per step (an FMA on AVX2 / AVX-512 machines, chosen at run time as for the other
// CPU kernels), and selects instead of branches so that irregular masks cost nothing. A parallel scan would do
// more arithmetic for no gain: the batch already gives every core enough rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include "row_kernel.h"

namespace rlhf_cpu {
namespace {

template <typename T>
struct GaeArgs {
  const T* rewards;
  const T* values;
  const bool* mask;
  float* adv;
  float* ret;
  float* stats;
  int64_t T_;
  float gamma, gamma_lam;
};

template <typename T>
struct GaeKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const GaeArgs<T>& p, int64_t r0, int64_t r1) {
    const int64_t T_ = p.T_;
    for (int64_t row = r0; row < r1; ++row) {
      const T* r = p.rewards + row * T_;
      const T* v = p.values + row * T_;
      const bool* m = p.mask + row * T_;
      float* a = p.adv + row * T_;
      float* rt = p.ret + row * T_;
      float acc = 0.0f, next_value = 0.0f;
      // Count, and fp64 sums of (adv - shift) and its square with shift = the row's first advantage: shifted
      // fp64 sums keep mean and M2 accurate to fp32 rounding, in the same pass and off the recursion's chain.
      float shift = 0.0f;
      double s1 = 0.0, s2 = 0.0;
      int64_t count = 0;
      for (int64_t t = T_ - 1; t >= 0; --t) {  // the serial chain is one multiply-add and one select per step
        const float vt = to_float(v[t]);
        const float delta = madd<kFma>(p.gamma, next_value, to_float(r[t])) - vt;
        const float cand = madd<kFma>(p.gamma_lam, acc, delta);
        const bool keep = m[t];
        acc = keep ? cand : acc;
        next_value = keep ? vt : next_value;
        a[t] = acc;
        rt[t] = acc + vt;
        shift = count == 0 ? acc : shift;
        const double d = keep ? static_cast<double>(acc) - shift : 0.0;
        s1 += d;
        s2 += d * d;
        count += keep;
      }
      const double mean_shifted = count > 0 ? s1 / static_cast<double>(count) : 0.0;
      p.stats[row * 3] = static_cast<float>(count);
      p.stats[row * 3 + 1] = count > 0 ? static_cast<float>(shift + mean_shifted) : 0.0f;
      p.stats[row * 3 + 2] = count > 0 ? static_cast<float>(std::max(0.0, s2 - s1 * mean_shifted)) : 0.0f;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                           const at::Tensor& mask, double gamma, double lam) {
  constexpr const char* op = "gae_fwd";
  TORCH_CHECK(rewards.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(), op,
              ": rewards, values and mask must be CPU tensors, got ", rewards.device(), ", ", values.device(), ", ",
              mask.device());
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be 2-D (B, T), got shape ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(), op,
              ": rewards, values and mask must have the same shape, got ", rewards.sizes(), ", ", values.sizes(),
              " and ", mask.sizes());
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": rewards must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, op, ": values must have the dtype of rewards (", dt, "), got ",
              values.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() && mask.is_contiguous(), op,
              ": rewards, values and mask must be contiguous (call .contiguous())");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts), stats = at::zeros({B, 3}, opts);
  if (B == 0 || T == 0) return {adv, ret, stats};
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "gae_fwd_cpu", [&] {
    const GaeArgs<scalar_t> args{rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
                                 adv.data_ptr<float>(),        ret.data_ptr<float>(),        stats.data_ptr<float>(),
                                 T,                            g,                            gl};
    at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) { run_rows<GaeKernel<scalar_t>>(args, r0, r1); });
  });
  return {adv, ret, stats};
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) { m.impl("gae_fwd", &rlhf_cpu::gae_fwd_cpu); }
