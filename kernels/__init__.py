"""Triton kernels for the compressed cache's hot paths; each has a PyTorch reference."""
