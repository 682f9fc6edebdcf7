// CPU implementation of gae_fwd (schema in csrc/module.cpp): masked generalised advantage estimation.
//
// Per row, backwards over t with next_value = acc = 0 (fp32):
//   mask[t]:  acc = (r_t + gamma next_value - V_t) + gamma lam acc,  next_value = V_t
//   else:     both carry;      advantages[t] = acc,  returns[t] = acc + V_t
// then the row's count, mean and M2 (sum of squared deviations from the row mean) of the advantages at masked
// positions, in two passes over the row while it is still in cache. Whitening over the batch merges these.
//
// On a CPU the recursion is cheapest as it is written: one row per thread (rows split with at::parallel_for),
// one dependent multiply-add per step, and selects instead of branches so that irregular masks cost nothing.
// A parallel scan would do more arithmetic for no gain: the batch already gives every core enough rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace rlhf_cpu {
namespace {

template <typename T>
inline float as_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
void gae_rows(const T* rewards, const T* values, const bool* mask, float* adv, float* ret, float* stats, int64_t T_,
              float gamma, float gamma_lam, int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const T* r = rewards + row * T_;
    const T* v = values + row * T_;
    const bool* m = mask + row * T_;
    float* a = adv + row * T_;
    float* rt = ret + row * T_;
    float acc = 0.0f, next_value = 0.0f;
    int64_t count = 0;
    float sum = 0.0f;
    for (int64_t t = T_ - 1; t >= 0; --t) {
      const float vt = as_float(v[t]);
      const float cand = (as_float(r[t]) + gamma * next_value - vt) + gamma_lam * acc;
      const bool keep = m[t];
      acc = keep ? cand : acc;
      next_value = keep ? vt : next_value;
      a[t] = acc;
      rt[t] = acc + vt;
      count += keep;
      sum += keep ? acc : 0.0f;
    }
    const float mean = count > 0 ? sum / static_cast<float>(count) : 0.0f;
    float m2 = 0.0f;
    for (int64_t t = 0; t < T_; ++t) {
      const float d = a[t] - mean;
      m2 += m[t] ? d * d : 0.0f;
    }
    stats[row * 3] = static_cast<float>(count);
    stats[row * 3 + 1] = mean;
    stats[row * 3 + 2] = m2;
  }
}

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
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    float *a = adv.data_ptr<float>(), *rt = ret.data_ptr<float>(), *st = stats.data_ptr<float>();
    at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) { gae_rows(r, v, m, a, rt, st, T, g, gl, r0, r1); });
  });
  return {adv, ret, stats};
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) { m.impl("gae_fwd", &rlhf_cpu::gae_fwd_cpu); }
