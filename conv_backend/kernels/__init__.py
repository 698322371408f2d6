"""Triton convolution kernels and their launch wrappers."""
