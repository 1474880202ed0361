"""Attention and KV-cache kernels: a CPU path (native kernels, vectorised PyTorch) and Triton kernels for CUDA."""

from kernels.cpu_profile import apply_to_environment

# oneDNN and ATen read their ISA caps once, at their first use: set them before any tensor work
# (kernels/cpu_profile.py).
apply_to_environment()
