"""Kernels for the compressed cache's hot paths (Triton on GPU, one fused C++ kernel on CPU); each has a PyTorch reference."""
