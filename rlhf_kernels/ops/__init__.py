"""Kernels and launchers, one module per op family."""
