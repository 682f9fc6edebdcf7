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

// The schemas of the compiled ops. Each op's contract (shapes, dtypes, layouts, maths, the values of ignored rows)
// is written once, in the op table rlhf_kernels/_registry.py, which holds the same schema for the op of the same
// name in Python (torch.ops.rlhf_kernels.<op>, plus a trailing `str backend`); tests/test_backend_registry.py
// checks that the schemas below and the table agree, tests/test_cross_backend.py that the outputs do.
TORCH_LIBRARY(rlhf_kernels_C, m) {
  // Per-token log-probabilities and entropy, and their gradient (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu).
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor grad_logprobs, Tensor grad_entropy,"
      " Tensor row_max, Tensor log_norm, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");

  // Exact KL over the vocabulary, and its gradient (csrc/cpu/kl.cpp, csrc/cuda/kl.cu).
  m.def(
      "kl_fwd(Tensor logits, Tensor ref_logits, Tensor? mask, float inv_temperature, bool reverse)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "kl_bwd(Tensor logits, Tensor ref_logits, Tensor? mask, Tensor grad_kl, Tensor row_max, Tensor log_norm,"
      " Tensor ref_row_max, Tensor ref_log_norm, Tensor kl, float inv_temperature, bool reverse) -> Tensor");

  // Masked GAE with per-row advantage statistics (csrc/cpu/gae.cpp, csrc/cuda/gae.cu).
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor, Tensor)");

  // PPO-family policy losses (clip, CISPO, SAPO; token or sequence log-ratios) and the clipped value loss, fused
  // with their gradients; the second output is the (K,) column sums (csrc/cpu/ppo_loss.cpp, csrc/cuda/ppo_loss.cu).
  m.def(
      "ppo_policy_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor weight, Tensor seq_offsets,"
      " float clip_low, float clip_high, float dual_clip, int loss_type, int ratio_level, float tau_pos,"
      " float tau_neg) -> (Tensor, Tensor)");
  m.def(
      "ppo_value_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor weight, float clip)"
      " -> (Tensor, Tensor)");
}
