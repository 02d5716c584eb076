"""The index and layout arithmetic of the CUDA kernels, checked on the CPU: each header below
holds only standard C++ (so it compiles without the CUDA headers), and a small C++ program in
tests/cpp/ runs it the way the kernels do, over many shapes, so a slip shows up without a GPU.

- activation_layout.h: which elements, mask bytes and maxout outputs each thread takes.
- loss_layout.h: the loss kernels' threads over (N, C, S) inputs with S > 1; every (n, s, class)
  read by one thread, every row written once, block and grid sizes within CUDA's limits.
- gemm_plan.h: the GEMM's split-K and the tensor-core loader's access width.
- lce_plan.h: the linear + cross entropy's row chunks and row-kernel threads.
- fused_mlp_plan.h: the fused MLP's shared-memory image (which MLPs fuse, alignment, fragment
  reads in bounds and free of bank conflicts), row tiles covering every row once, the fragment
  addressing against the PTX layouts of mma.m16n8k16, one warp's pass emulated by register."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GXX = shutil.which("g++")
HEADERS = {  # header name -> the includes it may have
    "activation_layout": ["<cstdint>"],
    "loss_layout": ["<cstdint>"],
    "gemm_plan": ["<algorithm>", "<cstdint>"],
    "lce_plan": ["<algorithm>", "<cstdint>"],
    "fused_mlp_plan": ["<algorithm>", "<cstdint>"],
}


@pytest.mark.parametrize("name", HEADERS)
def test_header_needs_no_cuda(name):
    """Only the standard library: the arithmetic is testable (and usable) without CUDA."""
    with open(os.path.join(ROOT, "csrc", "cuda", f"{name}.h")) as f:
        includes = re.findall(r"^\s*#\s*include\s*(\S+)", f.read(), flags=re.M)
    assert sorted(includes) == HEADERS[name]


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize("name", HEADERS)
def test_invariants(name, tmp_path):
    exe = tmp_path / f"{name}_test"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I",
                            os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "tests", "cpp", f"{name}_test.cpp"),
                            "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "warning" not in build.stderr, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().startswith("ok"), run.stdout
