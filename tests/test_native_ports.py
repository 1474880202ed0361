"""The native kernels on CPUs this machine is not: an ARM64 build, checked under qemu-user against the references in
tests/native/kernel_check.cpp (correctness only; emulated timings mean nothing). Needs Debian's
g++-aarch64-linux-gnu and qemu-user (scripts/install-arm64-tools.sh); skipped, with the reason, without them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import native

CROSS_COMPILER = shutil.which("aarch64-linux-gnu-g++")
EMULATOR = shutil.which("qemu-aarch64")
CHECK = Path(__file__).parent / "native" / "kernel_check.cpp"

pytestmark = pytest.mark.skipif(
    CROSS_COMPILER is None or EMULATOR is None,
    reason="no aarch64 cross-compiler or qemu-aarch64 (scripts/install-arm64-tools.sh installs them)",
)


@pytest.mark.parametrize("target_cpu", ["armv8.2-a+dotprod", "armv8-a"], ids=["neon-dotprod", "armv8-baseline"])
def test_the_kernels_build_and_compute_right_on_arm64(tmp_path: Path, target_cpu: str) -> None:
    """The library's sources, as kernels/native.py compiles them, for an ARM64 CPU with and without the dot-product
    extension, linked with the checks into one static program and run under emulation."""
    assert CROSS_COMPILER is not None and EMULATOR is not None
    compile_command = native.compile_command(CROSS_COMPILER, target_cpu)
    sources = [argument for argument in compile_command if argument.endswith(".cpp")]
    flags = [argument for argument in compile_command[1:] if argument not in sources and argument not in ("-shared",)]
    program = tmp_path / "kernel_check"
    build = subprocess.run(
        [CROSS_COMPILER, *flags, "-static", *sources, str(CHECK), "-o", str(program)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([EMULATOR, str(program)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout[-3000:]
