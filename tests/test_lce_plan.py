"""The host-side planning of the CUDA linear + cross entropy (csrc/cuda/lce_plan.h: row chunks
and row-kernel threads), checked on the CPU by a small C++ program over many shapes."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "cuda", "lce_plan.h")
PROGRAM = os.path.join(ROOT, "tests", "cpp", "lce_plan_test.cpp")
GXX = shutil.which("g++")


def test_header_needs_no_cuda():
    """Only the standard library: the plan is testable (and usable) without the CUDA headers."""
    with open(HEADER) as f:
        includes = re.findall(r"^\s*#\s*include\s*(\S+)", f.read(), flags=re.M)
    assert sorted(includes) == ["<algorithm>", "<cstdint>"]


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_lce_plan_invariants(tmp_path):
    exe = tmp_path / "lce_plan_test"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-I",
                            os.path.join(ROOT, "csrc"), PROGRAM, "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
