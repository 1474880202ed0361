"""Attention and KV-cache kernels: a CPU path (vectorised PyTorch) and Triton kernels for CUDA."""
