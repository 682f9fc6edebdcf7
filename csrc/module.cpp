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
}
