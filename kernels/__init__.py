"""Triton kernels, one op per file; kernels.reference holds the PyTorch references."""
