"""The CPU paths of the masked activations give the same bits: float32 and float64 run SIMD lanes
whose comparisons give the mask directly (csrc/cpu/lanes.h, 16 elements a step, AVX-512 or
AVX2), the other dtypes and the baseline instruction set a byte per element. Sizes around the
step, misaligned views, the ends of the threads' blocks, and every instruction set
(FASTOPS_CPU_ISA caps it) against this one."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import SUBPROCESS_CWD

import fastops

# op: parameters after the tensors
MASKED = {"relu": (), "leaky_relu": (0.2,), "hardtanh": (-0.5, 2.0), "hardshrink": (0.5,)}
# around the 16-element step and the 8-element byte; 100_003: several threads' blocks, one of
# which starts on a byte that is not a multiple of the step
SIZES = [1, 7, 8, 9, 15, 16, 17, 23, 31, 33, 47, 100_003]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -0.5, 0.5, 2.0, -2.0, 1e-40]


def bits(t):
    """The tensor's bytes, so -0.0 and +0.0 (and NaN payloads) count as different."""
    return t.contiguous().view(torch.uint8)


def masked_input(n, dtype, offset, seed=0):
    """n values (specials spread over the front and the back) in a view `offset` elements into
    its storage: misaligned for the vector loads when offset is odd."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + offset, generator=gen, dtype=torch.float64) * 2
    for k, v in enumerate(SPECIAL):
        x[offset + (k * 7919) % n] = v
    x[-1] = float("nan")  # in the scalar tail
    return x.to(dtype)[offset:]


def misaligned_copy(mask):
    storage = torch.zeros(mask.numel() + 1, dtype=torch.uint8)
    storage[1:] = mask
    return storage[1:]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op", list(MASKED))
def test_masked_forms_match_the_plain_loops_bit_for_bit(op, dtype, offset):
    """NAME_with_mask's output is NAME's (another loop), its mask the bits of NAME's
    predicate, and NAME_mask_backward gives NAME_backward's gradient, byte for byte, for every
    size around the step and a misaligned input, grad_output and mask."""
    ops = torch.ops.fastops
    params = MASKED[op]
    for n in SIZES:
        x = masked_input(n, dtype, offset)
        g = masked_input(n, dtype, offset, seed=1)
        out, mask = getattr(ops, op + "_with_mask")(x, *params)
        assert torch.equal(bits(out), bits(getattr(ops, op)(x, *params))), n
        # the plain backward of a gradient of ones gives 1 exactly where the bit is set
        passes = getattr(ops, op + "_backward")(torch.ones_like(x), x, *params) == 1
        padded = torch.cat([passes, passes.new_zeros(-n % 8)]).view(-1, 8).to(torch.int32)
        assert torch.equal(mask, (padded << torch.arange(8)).sum(1).to(torch.uint8)), n
        want = bits(getattr(ops, op + "_backward")(g, x, *params))
        assert torch.equal(bits(getattr(ops, op + "_mask_backward")(g, mask, *params)), want), n
        assert torch.equal(
            bits(getattr(ops, op + "_mask_backward")(g, misaligned_copy(mask), *params)), want), n


def masked_results():
    """Every masked op's output, mask and gradient for the sizes and layouts above."""
    ops = torch.ops.fastops
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for op, params in MASKED.items():
            for n in SIZES:
                for offset in (0, 1):
                    x = masked_input(n, dtype, offset)
                    g = masked_input(n, dtype, offset, seed=1)
                    y, mask = getattr(ops, op + "_with_mask")(x, *params)
                    out += [bits(y), mask, bits(getattr(ops, op + "_mask_backward")(g, mask,
                                                                                    *params))]
    return out


def test_every_cpu_isa_gives_the_same_masked_results(tmp_path):
    """The lanes (AVX-512 here, AVX2 when capped) and the byte loops (baseline) agree bit for
    bit on every output, mask and gradient."""
    here = masked_results()
    script = ("import sys, torch, fastops; sys.path.insert(0, sys.argv[2]); "
              "from test_masked_isa import masked_results; "
              "torch.save((fastops.cpu_isa(), masked_results()), sys.argv[1])")
    for isa in ("avx2", "baseline"):
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)],
                       env={**os.environ, "FASTOPS_CPU_ISA": isa}, check=True,
                       cwd=SUBPROCESS_CWD)
        ran, there = torch.load(path)
        assert ran in (isa, "baseline")
        assert len(here) == len(there)
        for k, (a, b) in enumerate(zip(here, there)):
            assert torch.equal(a, b), (isa, k)
    assert fastops.cpu_isa() in ("avx512", "avx2", "baseline")
