"""The thread layout of the CUDA loss kernels over (N, C, S) inputs with S > 1
(csrc/cuda/loss_layout.h), checked on the CPU: a small C++ program runs its index arithmetic for
every thread of simulated grids (tests/cpp/loss_layout_test.cpp). Needs g++, not a GPU."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "loss_layout_test.cpp")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_spatial_layout_covers_every_element_once(tmp_path):
    """Every (n, s, class) is read by exactly one thread and every row written once, under any
    grid; no thread reads past the tensor; block and grid sizes stay within CUDA's limits; a
    row's partition depends on the shape alone; small C and S keep a block's threads busy."""
    exe = tmp_path / "loss_layout_test"
    build = subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                            "-I", os.path.join(ROOT, "csrc"), SOURCE, "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok"), run.stdout
