"""Choosing the attention backend, and the native kernel's build path."""

from __future__ import annotations

import platform
import subprocess

import pytest
import torch

import kernels.registry
from kernels import native
from kernels.native import NativeKernelsUnavailable
from kernels.registry import get_attention_backend

CPU = torch.device("cpu")


def test_auto_uses_the_native_kernel_where_it_builds() -> None:
    assert get_attention_backend("auto", CPU, 64).name == "cpu"
    assert get_attention_backend("cpu", CPU, 128).name == "cpu"
    assert get_attention_backend("torch", CPU, 64).name == "torch"


def test_unsupported_head_dim_falls_back_or_fails_clearly() -> None:
    assert get_attention_backend("auto", CPU, 40).name == "torch"
    with pytest.raises(ValueError, match="head_dim 40"):
        get_attention_backend("cpu", CPU, 40)


def test_missing_compiler_falls_back_or_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> None:
        raise NativeKernelsUnavailable("no C++ compiler found")

    monkeypatch.setattr(kernels.registry, "load_native_kernels", unavailable)
    assert get_attention_backend("auto", CPU, 64).name == "torch"
    with pytest.raises(ValueError, match="'cpu' is unavailable: no C\\+\\+ compiler"):
        get_attention_backend("cpu", CPU, 64)


def test_unknown_backend_and_device() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash", CPU, 64)
    with pytest.raises(ValueError, match="no attention backend available for device 'meta'"):
        get_attention_backend("auto", torch.device("meta"), 64)


def test_compiler_lookup_honours_cxx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(NativeKernelsUnavailable, match="no C\\+\\+ compiler"):
        native._compiler()


def test_build_failure_reports_the_compiler_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(native, "SOURCES", (broken.name,))
    monkeypatch.setenv("SPINDLE_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NativeKernelsUnavailable, match=r"building broken\.cpp failed"):
        native._build(native._compiler())
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left for a later process to load


def test_a_failed_build_is_tried_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []

    def failing_build(compiler: str):
        attempts.append(compiler)
        raise NativeKernelsUnavailable("building broken.cpp failed: error")

    monkeypatch.setattr(native, "_build", failing_build)
    native._load_once.cache_clear()
    try:
        for _ in range(3):
            with pytest.raises(NativeKernelsUnavailable, match=r"broken\.cpp failed"):
                native.load_native_kernels()
        assert native.amx_kernels() is None
    finally:
        native._load_once.cache_clear()  # the other tests load the real kernels again
    assert len(attempts) == 1


def test_build_is_cached_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SPINDLE_KERNEL_CACHE", str(tmp_path))
    first = native._build(native._compiler())
    built_at = first.stat().st_mtime_ns
    assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == built_at


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 CPU targets")
@pytest.mark.parametrize("target_cpu", ["x86-64-v3", "x86-64-v4", "cooperlake", "sapphirerapids"])
def test_the_kernels_compile_for_cpus_with_and_without_avx512_and_amx(target_cpu: str) -> None:
    """The build is for this machine's CPU (-march=native): every other CPU's branch of the sources must compile too
    (AVX2 only; AVX-512 without BF16; AVX512-BF16 without AMX; AMX)."""
    result = subprocess.run(
        [*native.compile_command(native._compiler(), target_cpu), "-fsyntax-only"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
