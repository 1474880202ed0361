"""What Spindle will run on this CPU, in a few lines: ``spindle env`` prints them, ``spindle serve`` logs them.

Everything here is decided by the CPU probe (kernels/cpu_profile.py) and by what the native kernels were built with;
nothing needs a model.
"""

from __future__ import annotations

import os

import torch

from engine.config import AUTO_DTYPE, ModelConfig
from kernels.cpu_profile import cpu_profile
from kernels.native import INT8_ACTIVATIONS, NativeKernelsUnavailable, load_native_kernels


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def capability_report() -> list[tuple[str, str]]:
    """(what, chosen) pairs, each saying what runs and, where it is a fallback, why."""
    profile = cpu_profile()
    auto_dtype = str(ModelConfig(dtype=AUTO_DTYPE).torch_dtype).removeprefix("torch.")
    report = [
        ("cpu profile", profile.name),
        ("architecture", profile.architecture),
        ("kernel tier", profile.tier),
        ("native kernels target", f"-march={profile.compiler_target}"),
        ("oneDNN ISA cap", os.environ.get("ONEDNN_MAX_CPU_ISA", "none")),
        ("ATen vector code", torch.backends.cpu.get_cpu_capability()),
        (
            "dtype auto",
            f"{auto_dtype} ("
            + ("the CPU has bf16 dot products" if profile.has_native_bf16 else "no bf16 dot products: fp32")
            + ")",
        ),
        (
            "oneDNN bf16 weight packing",
            _yes(profile.onednn_packs_bf16) + ("" if profile.onednn_packs_bf16 else " (needs AVX-512BW/VL/DQ)"),
        ),
    ]
    if profile.tier == "scalar":
        report.append(("note", "no AVX2 or NEON: the native kernels run their portable paths (slower)"))
    try:
        kernels = load_native_kernels()
    except NativeKernelsUnavailable as exc:
        return [*report, ("native kernels", f"unavailable, PyTorch's CPU paths serve instead: {exc}")]
    names = {INT8_ACTIVATIONS: "fp32 quantized to int8 (4-bit; --activation-quantization int8)"}
    dtypes = " and ".join(
        sorted(names.get(dtype, str(dtype).removeprefix("torch.")) for dtype in kernels.quantized_linear_dtypes)
    )
    return [
        *report,
        ("native kernels", "built"),
        ("4/8-bit linear kernels", f"for {dtypes} activations"),
        ("AMX linear kernel", _yes(kernels.has_amx)),
        (
            "bf16 prompt attention kernel",
            _yes(kernels.has_prompt_attention) + ("" if kernels.has_prompt_attention else " (needs AVX512-BF16)"),
        ),
    ]
