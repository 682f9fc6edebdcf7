"""rlhf: the training layer on rlhf_kernels."""
