"""Every kernel path bit-identical to the portable one, by tests/native/kernel_paths.cpp.

That program compiles the kernels without Python, so the Arm path (kernel_neon.inc) is
checked too, although this machine is x86: built by Debian's cross compiler and run under
qemu-aarch64, whose default CPU has the dot-product instructions (and a Cortex-A72, which
has not, must not be given the path); and built by clang, which has its own target pragmas.
.ci/run installs those tools; elsewhere a test whose tool is missing is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[1] / "native" / "kernel_paths.cpp"
FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-pthread"]


def build(compiler: str, out: Path, *extra: str) -> Path:
    command = [compiler, *FLAGS, *extra, str(SOURCE), "-o", str(out)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]  # the compiler's own message
    return out


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=300)


def test_every_path_of_this_cpu_gives_the_portable_bits(tmp_path: Path) -> None:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ (the native extension is not built either)")
    result = run(str(build(compiler, tmp_path / "kernel_paths")))
    assert result.returncode == 0, result.stdout
    for line in result.stdout.splitlines():
        assert line.endswith(": bit-identical"), result.stdout


def clang() -> str | None:
    """clang++ under its plain name or a versioned one (Debian's clang-14 ... clang-19)."""
    names = ["clang++", *(f"clang++-{v}" for v in range(19, 13, -1))]
    return next((path for path in map(shutil.which, names) if path), None)


def test_clang_builds_the_same_paths(tmp_path: Path) -> None:
    """clang ignores GCC's target pragmas: intrinsics.h gives it its own, so it builds the
    AVX2 and AVX-512 paths too (an Intel Mac's compiler), with the portable bits."""
    compiler = clang()
    if compiler is None:
        pytest.skip("no clang++ (.ci/run installs Debian's clang where it can)")
    result = run(str(build(compiler, tmp_path / "kernel_paths_clang")))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines and all(line.endswith(": bit-identical") for line in lines), result.stdout
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " avx2" in cpuinfo.read_text():  # a SIMD path was built, checked
        assert any(line.startswith(("avx2", "avx512")) for line in lines), result.stdout


def test_the_arm_path_gives_the_portable_bits_under_emulation(tmp_path: Path) -> None:
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
    binary = str(build(compiler, tmp_path / "kernel_paths_arm", "-static"))
    result = run(qemu, binary, "--require", "neon")
    assert (result.returncode, result.stdout) == (0, "neon: bit-identical\n")
    without = run(qemu, "-cpu", "cortex-a72", binary, "--require", "neon")
    assert (without.returncode, without.stdout) == (2, "this CPU does not run the neon path\n")
