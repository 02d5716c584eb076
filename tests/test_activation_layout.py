"""The index arithmetic of the CUDA activation kernels (csrc/cuda/activation_layout.h), checked on
the CPU: tests/cpp/activation_layout_test.cpp walks every thread of the kernels' grids the way
they do, so a slip in which elements, mask bytes or maxout outputs a thread takes shows up
without a GPU."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_every_index_handled_once_and_in_bounds(tmp_path):
    exe = tmp_path / "activation_layout_test"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-I", str(ROOT / "csrc"),
         str(ROOT / "tests" / "cpp" / "activation_layout_test.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
