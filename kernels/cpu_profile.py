"""What this CPU can run, as every layer of Spindle sees it: one probe, optionally capped by an ISA profile.

Spindle's native kernels, oneDNN (PyTorch's CPU matmuls) and ATen's vectorised operators each pick code for the CPU
they find. ``SPINDLE_CPU_PROFILE`` caps all three at once, so a lesser CPU's code paths can be run and tested on a
better one:

| profile  | Spindle's probe reports                  | native kernels built for | oneDNN cap   | ATen cap |
| -------- | ---------------------------------------- | ------------------------ | ------------ | -------- |
| native   | the CPU's own flags                      | ``-march=native``        | none         | none     |
| avx512   | AVX-512F/BW/VL/DQ, no BF16, AMX or VNNI  | ``-march=x86-64-v4``     | AVX512_CORE  | avx512   |
| avx2     | AVX2 + FMA + F16C (x86-64-v3)            | ``-march=x86-64-v3``     | AVX2         | avx2     |
| scalar   | nothing beyond the architecture's base   | the base architecture    | SSE41        | default  |

A profile only takes features away: on a CPU without AVX-512 the ``avx512`` profile reports what the CPU has. The
oneDNN and ATen caps are environment variables that both libraries read once, at their first use, so
``apply_to_environment`` must run before any tensor work (``kernels/__init__.py`` calls it on import). This module
imports nothing heavy for that reason.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

logger = logging.getLogger("spindle.kernels")

PROFILE_VARIABLE = "SPINDLE_CPU_PROFILE"
PROFILES = ("native", "avx512", "avx2", "scalar")
X86_ARCHITECTURES = ("x86_64", "amd64")
ARM_ARCHITECTURES = ("aarch64", "arm64")

_AVX2 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
# The features each profile lets through; None: all of them.
_PROFILE_CAPS: dict[str, frozenset[str] | None] = {
    "native": None,
    "avx512": _AVX512,
    "avx2": _AVX2,
    "scalar": frozenset(),
}
# Each capped profile's compiler target, oneDNN cap and ATen cap (x86-64 only; "scalar" on ARM has its own target).
_PROFILE_TARGETS = {
    "avx512": ("x86-64-v4", "AVX512_CORE", "avx512"),
    "avx2": ("x86-64-v3", "AVX2", "avx2"),
    "scalar": ("x86-64", "SSE41", "default"),
}
_ARM_BASE_TARGET = "armv8-a"


class CpuProfileError(ValueError):
    """A profile that does not exist, or does not exist for this CPU's architecture."""


@dataclass(frozen=True)
class CpuProfile:
    name: str  # one of PROFILES
    architecture: str  # platform.machine(), lower case
    features: frozenset[str]  # the CPU's feature flags (as /proc/cpuinfo names them) the profile lets through
    compiler_target: str  # the native kernels' -march
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA, None: uncapped
    aten_capability: str | None  # ATEN_CPU_CAPABILITY, None: uncapped

    @property
    def is_x86(self) -> bool:
        return self.architecture in X86_ARCHITECTURES

    @property
    def has_avx2(self) -> bool:
        return self.is_x86 and {"avx2", "fma", "f16c"} <= self.features

    @property
    def has_avx512(self) -> bool:
        return self.is_x86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= self.features

    @property
    def has_native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX-BF16): where bf16 compute is fast, not emulated."""
        return self.has_avx512 and ("avx512_bf16" in self.features or "amx_bf16" in self.features)

    @property
    def has_amx(self) -> bool:
        return self.has_native_bf16 and {"amx_tile", "amx_bf16"} <= self.features

    @property
    def onednn_packs_bf16(self) -> bool:
        """Whether oneDNN's bf16 weight prepacking runs here: PyTorch refuses it without AVX-512BW/VL/DQ or
        AVX-NE-CONVERT, with an error rather than a fallback."""
        return self.has_avx512 or (self.is_x86 and "avx_ne_convert" in self.features)

    @property
    def tier(self) -> str:
        """The best kernel tier the features allow: amx, avx512-bf16, avx512, avx2, neon-dotprod, neon or scalar."""
        if self.has_amx:
            return "amx"
        if self.has_native_bf16:
            return "avx512-bf16"
        if self.has_avx512:
            return "avx512"
        if self.has_avx2:
            return "avx2"
        if self.architecture in ARM_ARCHITECTURES and "asimd" in self.features:
            return "neon-dotprod" if "asimddp" in self.features else "neon"
        return "scalar"

    def describe(self) -> str:
        return f"profile {self.name}, {self.architecture}, kernel tier {self.tier}, -march={self.compiler_target}"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 ``flags``, ARM ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # no /proc (not Linux): nothing is known, so nothing beyond the base architecture is used


def profile_for(name: str, architecture: str, flags: frozenset[str]) -> CpuProfile:
    """The profile ``name`` on a CPU of ``architecture`` with ``flags``."""
    if name not in PROFILES:
        raise CpuProfileError(f"{PROFILE_VARIABLE} must be one of {', '.join(PROFILES)}, got {name!r}")
    architecture = architecture.lower()
    cap = _PROFILE_CAPS[name]
    features = flags if cap is None else flags & cap
    if name == "native":
        return CpuProfile(name, architecture, features, "native", None, None)
    if architecture in ARM_ARCHITECTURES and name == "scalar":
        return CpuProfile(name, architecture, features, _ARM_BASE_TARGET, None, None)
    if architecture not in X86_ARCHITECTURES:
        raise CpuProfileError(f"CPU profile {name!r} is for x86-64 CPUs; this one is {architecture}")
    target, onednn, aten = _PROFILE_TARGETS[name]
    return CpuProfile(name, architecture, features, target, onednn, aten)


@cache
def cpu_profile() -> CpuProfile:
    """This process's profile: ``SPINDLE_CPU_PROFILE`` (default native) over this CPU's flags."""
    name = os.environ.get(PROFILE_VARIABLE, "native").strip().lower() or "native"
    return profile_for(name, platform.machine(), cpu_flags(_read_cpuinfo()))


def apply_to_environment() -> None:
    """Cap oneDNN and ATen at the profile's ISA (unless the caller set their variables already). A profile name that
    does not exist is left for ``cpu_profile()``'s callers to report, as a configuration error."""
    try:
        profile = cpu_profile()
    except CpuProfileError:
        return
    for variable, value in (
        ("ONEDNN_MAX_CPU_ISA", profile.onednn_max_isa),
        ("ATEN_CPU_CAPABILITY", profile.aten_capability),
    ):
        if value is not None:
            os.environ.setdefault(variable, value)
