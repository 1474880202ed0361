"""The CPU probe and its profiles: what each profile lets through, and what a lesser CPU's start-up does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.cpu_profile import PROFILES, CpuProfileError, cpu_flags, profile_for

ROOT = Path(__file__).resolve().parents[1]
# Flags as Linux lists them (/proc/cpuinfo), trimmed: a Sapphire Rapids (AMX), an Ice Lake Xeon (AVX-512, no BF16),
# an AMD Zen 3 (AVX2 only) and an ARM Neoverse N1.
SAPPHIRE_RAPIDS = "flags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 movbe popcnt avx512f avx512bw \
avx512vl avx512dq avx512cd avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8 avx_vnni"
ICE_LAKE = "flags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw avx512vl avx512dq \
avx512cd avx512_vnni"
ZEN3 = "flags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 movbe popcnt"
NEOVERSE = "processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp"


def test_flags_are_read_from_x86_and_arm_cpuinfo() -> None:
    assert {"avx2", "amx_tile"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert {"asimd", "asimddp"} <= cpu_flags(NEOVERSE)
    assert cpu_flags("processor : 0\nmodel name : something") == frozenset()


@pytest.mark.parametrize(
    ("flags", "tiers"),
    [
        (SAPPHIRE_RAPIDS, {"native": "amx", "avx512": "avx512", "avx2": "avx2", "scalar": "scalar"}),
        (ICE_LAKE, {"native": "avx512", "avx512": "avx512", "avx2": "avx2", "scalar": "scalar"}),
        # A profile never adds what the CPU lacks: avx512 on an AVX2-only CPU is that CPU.
        (ZEN3, {"native": "avx2", "avx512": "avx2", "avx2": "avx2", "scalar": "scalar"}),
    ],
    ids=["sapphire-rapids", "ice-lake", "zen3"],
)
def test_each_profile_caps_the_tier(flags: str, tiers: dict[str, str]) -> None:
    for name, tier in tiers.items():
        assert profile_for(name, "x86_64", cpu_flags(flags)).tier == tier, name


def test_profiles_cap_onednn_aten_and_the_compiler_alike() -> None:
    flags = cpu_flags(SAPPHIRE_RAPIDS)
    native = profile_for("native", "x86_64", flags)
    assert (native.compiler_target, native.onednn_max_isa, native.aten_capability) == ("native", None, None)
    assert native.has_native_bf16 and native.has_amx and native.onednn_packs_bf16
    avx512 = profile_for("avx512", "x86_64", flags)
    assert (avx512.compiler_target, avx512.onednn_max_isa, avx512.aten_capability) == (
        "x86-64-v4",
        "AVX512_CORE",
        "avx512",
    )
    assert not avx512.has_native_bf16 and avx512.onednn_packs_bf16  # bf16 emulated, but oneDNN still packs it
    avx2 = profile_for("avx2", "x86_64", flags)
    assert (avx2.compiler_target, avx2.onednn_max_isa, avx2.aten_capability) == ("x86-64-v3", "AVX2", "avx2")
    assert not avx2.onednn_packs_bf16  # PyTorch's prepacking raises here: start-up must not call it
    scalar = profile_for("scalar", "x86_64", flags)
    assert (scalar.compiler_target, scalar.features) == ("x86-64", frozenset())


def test_arm_has_native_and_scalar_profiles_only() -> None:
    flags = cpu_flags(NEOVERSE)
    assert profile_for("native", "aarch64", flags).tier == "neon-dotprod"
    scalar = profile_for("scalar", "aarch64", flags)
    assert (scalar.tier, scalar.compiler_target) == ("scalar", "armv8-a")
    with pytest.raises(CpuProfileError, match="for x86-64 CPUs"):
        profile_for("avx2", "aarch64", flags)


def test_a_profile_that_does_not_exist_is_refused() -> None:
    with pytest.raises(CpuProfileError, match="must be one of native, avx512, avx2, scalar"):
        profile_for("avx3", "x86_64", cpu_flags(ZEN3))
    assert PROFILES == ("native", "avx512", "avx2", "scalar")


def _spindle(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environment}
    for variable in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "SPINDLE_CPU_PROFILE"):
        env.pop(variable, None)
    env.update(environment)
    command = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_bad_profile_name_is_one_line_of_error_not_a_stack_trace() -> None:
    result = _spindle("env", SPINDLE_CPU_PROFILE="avx3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("spindle: error: SPINDLE_CPU_PROFILE must be one of")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the avx2 profile is for x86-64 CPUs")
def test_the_avx2_profile_caps_aten_and_onednn_before_any_tensor_work() -> None:
    result = _spindle("env", SPINDLE_CPU_PROFILE="avx2")
    assert result.returncode == 0, result.stderr
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())
    assert lines["kernel tier"] == "avx2"
    assert lines["oneDNN ISA cap"] == "AVX2" and lines["ATen vector code"] == "AVX2"
    assert lines["dtype auto"].startswith("float32")
    assert lines["oneDNN bf16 weight packing"].startswith("no")
    assert lines["native kernels target"] == "-march=x86-64-v3"


def test_without_a_compiler_the_pytorch_paths_serve_and_say_so_once(tmp_path: Path) -> None:
    result = _spindle(
        "generate",
        "The quick brown fox",
        "--max-tokens",
        "4",
        "--dtype",
        "float32",
        CXX=str(tmp_path / "no-such-compiler"),
        SPINDLE_KERNEL_CACHE=str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr.count("native CPU kernels unavailable") == 1
    assert "no C++ compiler found" in result.stderr and "Traceback" not in result.stderr
