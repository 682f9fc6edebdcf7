// Entry point of the compiled extension `rlhf_kernels._C`.
//
// Importing the module runs the static registrations of every op in csrc/:
// the schemas below, and the CPU / CUDA implementations registered by
// csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL. The Python
// module itself is empty; ops are reached through torch.ops.rlhf_kernels_C.
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "rlhf_kernels compiled ops (registered with torch.library)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rlhf_kernels_C, m) {
  // logits: (B, T, V), any strides with stride(2) == 1; labels: (B, T) int64 contiguous.
  // Returns fp32 (B, T) contiguous: logprobs, entropy, row_max, log_norm, where z = logits * inv_temperature,
  // row_max = max z and log_norm = log sum exp(z - row_max). The log-sum-exp is kept as these two parts (never
  // summed) so that log-probs (z - row_max) - log_norm keep full fp32 precision when |logsumexp| is large.
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradient of (logprobs, entropy) with respect to logits: (B, T, V) contiguous, logits dtype.
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor grad_logprobs, Tensor grad_entropy,"
      " Tensor row_max, Tensor log_norm, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");

  // Exact per-token KL between p = softmax(logits * inv_temperature) and q = softmax(ref_logits * inv_temperature).
  // logits: (B, T, V), ref_logits: (B2, T2, V) with B2 * T2 == B * T = N (the two may be split differently and
  // have different float dtypes); stride(2) == 1 for both, any other strides. mask: None or (N,) bool contiguous;
  // masked-out rows are never read and give kl = row_max = log_norm = ref_row_max = ref_log_norm = 0.
  // reverse = true: KL(p || q) = sum_v p_v (log p_v - log q_v); false: KL(q || p).
  // Returns fp32 (N,) contiguous: kl (clamped to >= 0; NaN if either row holds a NaN or +-inf logit),
  // row_max, log_norm (of z = logits * inv_temperature), ref_row_max, ref_log_norm (of ref_logits).
  m.def(
      "kl_fwd(Tensor logits, Tensor ref_logits, Tensor? mask, float inv_temperature, bool reverse)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient of kl with respect to logits: (B, T, V) contiguous, logits dtype; zero on masked-out rows.
  // grad_kl and the four statistics and kl (as returned by kl_fwd) are fp32 (N,) contiguous.
  m.def(
      "kl_bwd(Tensor logits, Tensor ref_logits, Tensor? mask, Tensor grad_kl, Tensor row_max, Tensor log_norm,"
      " Tensor ref_row_max, Tensor ref_log_norm, Tensor kl, float inv_temperature, bool reverse) -> Tensor");

  // Masked GAE. rewards, values: (B, T) contiguous, one float dtype (float32 / bfloat16 / float16); mask: (B, T)
  // bool contiguous. Backwards over t with next_value = acc = 0: where mask, acc = r + gamma next_value - V +
  // gamma lam acc and next_value = V; elsewhere both carry. Returns fp32 advantages (B, T) (acc after step t),
  // returns (B, T) = advantages + values, and row_stats (B, 3): count, mean and M2 (sum of squared deviations
  // from the mean) of the advantages at masked positions of each row (zeros for a row without one).
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor, Tensor)");

  // PPO clipped surrogate, per token i of N, fused with its gradient. logprobs, old_logprobs, advantages, weight:
  // (N,) fp32 contiguous, one device. Token i counts iff weight[i] != 0 (its other inputs are then never used, so
  // padding may hold anything, NaN included). With d = logprobs - old_logprobs, r = exp(clamp(d, -20, 20)), A:
  //   l1 = -A r,  l2 = -A clamp(r, 1 - clip_low, 1 + clip_high);  clipped = l2 > l1;  l = clipped ? l2 : l1
  //   dual_clip > 0 and A < 0 and l > -A dual_clip:  l = -A dual_clip, lower = 1 (else lower = 0)
  //   dl/dlogprobs = 0 if clipped or lower or |d| > 20, else -A r
  // Returns grad (N,) fp32 = weight * dl/dlogprobs (0 where the token does not count) and partials (P, 4) fp32,
  // P >= 1 chosen by the backend, whose column sums over the counted tokens are:
  //   [sum weight * l, count of clipped, sum (old_logprobs - logprobs), count of lower].
  m.def(
      "ppo_policy_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor weight, float clip_low,"
      " float clip_high, float dual_clip) -> (Tensor, Tensor)");
  // Clipped value loss, per token, fused with its gradient. values, old_values, returns, weight: (N,) fp32
  // contiguous; token i counts iff weight[i] != 0. With a = v - R, vc = min(max(v, old - clip), old + clip)
  // (clip may be +inf: no clipping), b = vc - R:
  //   clipped = b^2 > a^2;  l = 0.5 * (clipped ? b^2 : a^2);  dl/dv = clipped ? 0 : a
  // Returns grad (N,) fp32 = weight * dl/dv (0 where the token does not count) and partials (P, 2) fp32 whose
  // column sums over the counted tokens are [sum weight * l, count of clipped].
  m.def(
      "ppo_value_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor weight, float clip)"
      " -> (Tensor, Tensor)");
}
