"""The shared-memory layout of the fused MLP kernels (csrc/cuda/fused_mlp_plan.h), checked on the
CPU by a small C++ program over many shapes: which MLPs fuse, every layer's block inside the
image, alignment, the kernels' fragment reads inside their blocks and free of bank conflicts, the
row tiles covering every row once, the fragment addressing against the PTX layouts of
mma.m16n8k16, and one warp's forward and input gradient emulated register by register."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "cuda", "fused_mlp_plan.h")
PROGRAM = os.path.join(ROOT, "tests", "cpp", "fused_mlp_plan_test.cpp")
GXX = shutil.which("g++")


def test_header_needs_no_cuda():
    """Only the standard library: the plan is testable without the CUDA headers."""
    with open(HEADER) as f:
        includes = re.findall(r"^\s*#\s*include\s*(\S+)", f.read(), flags=re.M)
    assert sorted(includes) == ["<algorithm>", "<cstdint>"]


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_fused_mlp_plan_invariants(tmp_path):
    exe = tmp_path / "fused_mlp_plan_test"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-I",
                            os.path.join(ROOT, "csrc"), PROGRAM, "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "warning" not in build.stderr, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
