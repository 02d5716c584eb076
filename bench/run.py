"""Benchmark harness: every fastops op against torch eager and torch.compile, forward, backward
and forward+backward, at a small and a large size (and on the CPU an xl one, 64 MB tensors).

    python -m bench.run                 # all ops, CPU, float32 -> bench/results/<device>.csv
    python -m bench.run --ops elu,gelu --sizes large --no-compile
    python -m bench.run --device cuda --dtype float32,bfloat16
    python -m bench.run --ops gan_gp_step --sizes large --out /tmp/gan_gp.csv   # one case

gan_gp_step is one gradient-penalty step of a WGAN-GP critic (an MLP 2 -> h -> h -> h -> 1 with
LeakyReLU(0.2); batch 256, h 128 at small, the critic of `fastops-train gan --loss wgan-gp`;
batch 4096, h 512 at large): its fwd is the forward, the input gradient with create_graph=True
and the penalty 10 * mean((|grad|_2 - 1)^2); its bwd the backward of the penalty to the weights
(a double backward); fwd+bwd the whole step. It has no compile peer: torch.compile's autograd
does not support a double backward.

Each row reports the median time (p20/p80 beside it), the achieved GB/s (bytes that must move)
or GFLOP/s, that figure as a fraction of the ceiling measured at the start of the same run
(copy bandwidth, torch.matmul throughput), and the speed-up of fastops over each peer
(peer time / fastops time, measured in the same run: after 3 warm-up calls each, the peers
take turns, 3 rounds of a third of --min-run-time each). Times always synchronise the device.
The ceiling of each row is in its `ceiling` column (GB/s or GFLOP/s, matching `metric`).
`saved_mb` is what autograd keeps for backward after one forward. On Linux the harness pins
glibc's heap thresholds for every peer alike (pin_malloc; --default-malloc keeps them adaptive).
"""

import argparse
import csv
import ctypes
import datetime
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as TF
from torch.utils import benchmark

import fastops
import fastops.functional as F

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """inputs: the tensors to differentiate (first) and then other arguments; fastops/torch: the
    two implementations, called as fn(*inputs); work(mode): bytes or flops per call."""
    kernel: str
    size: str
    shape: str
    inputs: list
    fastops: Callable
    torch: Callable
    work: Callable
    unit: str  # "GB/s" or "GFLOP/s"
    # fn takes a gradient itself (create_graph=True): its fwd runs with autograd on, its backward
    # is a double backward, and torch.compile (whose aot_autograd cannot differentiate twice)
    # sits it out
    double_backward: bool = False
    # more peers beside torch and torch.compile, {name: fn} (torch's chunked linear cross entropy)
    peers: dict = field(default_factory=dict)
    modes: tuple = ("fwd", "bwd", "fwd+bwd")


# ------------------------------------------------------------------------------------------
# The cases. Elementwise bytes: forward reads x and writes y; backward reads x and grad_y and
# writes grad_x.

ELEMENTWISE = {
    "relu": (F.relu, TF.relu, {}),
    "elu": (F.elu, TF.elu, {}),
    "gelu": (F.gelu, TF.gelu, {}),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda x: TF.gelu(x, approximate="tanh"), {}),
    "hardtanh": (F.hardtanh, TF.hardtanh, {}),
    "leaky_relu": (F.leaky_relu, TF.leaky_relu, {}),
    # training mode: a random slope per element, drawn again by the backward (fastops) or kept
    # in a noise tensor (torch)
    "rrelu": (lambda x: F.rrelu(x, training=True), lambda x: TF.rrelu(x, training=True), {}),
    "sigmoid": (F.sigmoid, torch.sigmoid, {}),
    "tanh": (F.tanh, torch.tanh, {}),
    "hardshrink": (F.hardshrink, TF.hardshrink, {}),
}
# Sizes per device: (rows, cols) of the elementwise ops, (M, K, N) of linear, (batch, classes)
# of the softmax losses and of multi_margin, (batch, hidden width) of the gradient-penalty
# critic, the batch of the fused-MLP cases (spiral: the 2-100-3 net with cross entropy; mlp:
# the 32-64x4-16 ReLU net). The CPU's large is 4M elements; the GPU's 2^26, with the linear
# and cross-entropy shapes of the GPU targets.
# "xl" is 64 MB elementwise tensors on the CPU, the 131072-class cross entropy on the GPU.
SIZES = {
    "cpu": {
        "small": dict(elementwise=(256, 256), linear=(256, 256, 256), softmax=(256, 1000),
                      gan_gp=(256, 128), margin=(256, 1000), spiral=100, mlp=1024),
        "large": dict(elementwise=(2048, 2048), linear=(1024, 1024, 1024),
                      softmax=(4096, 32000), gan_gp=(4096, 512), margin=(4096, 1000),
                      spiral=3000, mlp=65536, lce=(2048, 512, 32000)),
        # 64 MB tensors: past the L3 and past malloc's mmap threshold (fresh pages every call)
        "xl": dict(elementwise=(4096, 4096), lce=(4096, 1024, 32000)),
        # a language model's head: 1024 tokens, hidden 2048, Llama 3's 128256-token vocabulary
        # (the reference's logits: 0.5 GB each way); about 8 s per forward + backward
        "lm": dict(lce=(1024, 2048, 128256)),
    },
    "cuda": {
        "small": dict(elementwise=(256, 256), linear=(256, 256, 256), softmax=(256, 1000),
                      gan_gp=(256, 128), margin=(256, 1000), spiral=100, mlp=1024),
        "large": dict(elementwise=(8192, 8192), linear=(4096, 4096, 4096),
                      softmax=(8192, 32768), gan_gp=(4096, 512), margin=(32768, 1000),
                      spiral=3000, mlp=65536),
        # lce_gpu: (tokens, hidden, vocabulary) of an LLM head (Llama 3's 128256 classes)
        "xl": dict(softmax=(4096, 131072), lce_gpu=(8192, 4096, 128256)),
    },
}


def elementwise_bytes(n, es):
    return {"fwd": 2 * n * es, "bwd": 3 * n * es, "fwd+bwd": 5 * n * es}


def torch_maxout(x, k):
    return x.view(x.shape[0], x.shape[1] // k, k).max(dim=2).values


def make_cases(device, dtype, sizes):
    es = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    cases = []
    for size in sizes:
        shapes = SIZES[device][size]
        cases += elementwise_cases(size, shapes, randn, g, device, dtype, es)
        cases += linear_cases(size, shapes, randn)
        cases += softmax_cases(size, shapes, randn, g, device, es)
        cases += gan_gp_cases(size, shapes, randn)
        cases += margin_cases(size, shapes, randn, g, device, es)
        cases += mlp_cases(size, shapes, randn, g, device)
        cases += fused_mlp_gpu_cases(size, device, randn)
        cases += linear_cross_entropy_cases(size, shapes, randn, g, device)
        cases += lce_gpu_cases(size, shapes, randn, g, device)
    return cases


def linear_cross_entropy_cases(size, shapes, randn, g, device):
    """cross_entropy(linear(x, W), t) at (N, H, V): fastops's fused op, torch's reference
    (F.linear_cross_entropy, options=None: the logits materialised) and torch's chunked path
    (options=LinearCrossEntropyOptions()). The work is the GEMMs': 2 N H V per GEMM, one in the
    forward, three in forward + backward (the softmax pass is not counted), so the achieved
    GFLOP/s is comparable with the torch.matmul ceiling."""
    if "lce" not in shapes:
        return []
    n, h, v = shapes["lce"]
    gemm = 2 * n * h * v
    flops = {"fwd": gemm, "bwd": 2 * gemm, "fwd+bwd": 3 * gemm}
    inputs = [randn(n, h), randn(v, h, scale=h ** -0.5),
              torch.randint(0, v, (n,), generator=g).to(device)]
    chunked = torch.nn.LinearCrossEntropyOptions()
    return [Case("linear_cross_entropy", size, f"{n}x{h}x{v}", inputs,
                 F.linear_cross_entropy, TF.linear_cross_entropy, flops.get, "GFLOP/s",
                 peers={"chunked": lambda x, w, t: TF.linear_cross_entropy(x, w, t,
                                                                           options=chunked)},
                 modes=("fwd", "fwd+bwd"))]


def elementwise_cases(size, shapes, randn, g, device, dtype, es):
    cases = []
    if "elementwise" in shapes:
        rows, cols = shapes["elementwise"]
        n = rows * cols
        shape = f"{rows}x{cols}"
        for name, (fo, tf, _) in ELEMENTWISE.items():
            b = elementwise_bytes(n, es)
            cases.append(Case(name, size, shape, [randn(rows, cols)], fo, tf, b.get, "GB/s"))
        w = (torch.rand(cols, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
        b = elementwise_bytes(n, es)
        cases.append(Case("prelu", size, shape + " C=" + str(cols), [randn(rows, cols), w],
                          F.prelu, TF.prelu, b.get, "GB/s"))
        k = 4
        mb = {"fwd": n * es + n // k * es, "bwd": 2 * n * es + n // k * es}
        mb["fwd+bwd"] = mb["fwd"] + mb["bwd"]
        cases.append(Case("maxout", size, shape + f" k={k}", [randn(rows, cols), k],
                          F.maxout, torch_maxout, mb.get, "GB/s"))
        mse = {"fwd": 2 * n * es, "bwd": 3 * n * es}
        mse["fwd+bwd"] = mse["fwd"] + mse["bwd"]
        target = randn(rows, cols, grad=False)
        cases.append(Case("mse_loss", size, shape, [randn(rows, cols), target],
                          F.mse_loss, TF.mse_loss, mse.get, "GB/s"))
        # +-1 targets in the input's dtype; the same bytes as mse_loss
        signs = (torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1).to(device, dtype)
        cases.append(Case("hinge_embedding", size, shape, [randn(rows, cols), signs],
                          F.hinge_embedding_loss, TF.hinge_embedding_loss, mse.get, "GB/s"))
        # the other elementwise losses move the bytes of mse_loss; bce takes probabilities
        cases.append(Case("l1_loss", size, shape, [randn(rows, cols), target],
                          F.l1_loss, TF.l1_loss, mse.get, "GB/s"))
        probs = (torch.rand(rows, cols, generator=g) * 0.98 + 0.01).to(device, dtype)
        labels = torch.rand(rows, cols, generator=g).to(device, dtype)
        cases.append(Case("bce", size, shape, [probs.requires_grad_(True), labels],
                          F.binary_cross_entropy, TF.binary_cross_entropy, mse.get, "GB/s"))
        cases.append(Case("bce_logits", size, shape, [randn(rows, cols, scale=3.0), labels],
                          F.binary_cross_entropy_with_logits,
                          TF.binary_cross_entropy_with_logits, mse.get, "GB/s"))
    return cases


def linear_cases(size, shapes, randn):
    cases = []
    for m, kk, nn_ in [shapes["linear"]] if "linear" in shapes else []:
        flops = {"fwd": 2 * m * kk * nn_, "bwd": 4 * m * kk * nn_, "fwd+bwd": 6 * m * kk * nn_}
        lin_in = [randn(m, kk), randn(nn_, kk, scale=kk ** -0.5), randn(nn_)]
        cases.append(Case("linear", size, f"{m}x{kk}x{nn_}", lin_in, F.linear, TF.linear,
                          flops.get, "GFLOP/s"))
        cases.append(Case("linear+gelu", size, f"{m}x{kk}x{nn_}", lin_in,
                          lambda x, w, b: F.linear_act(x, w, b, "gelu"),
                          lambda x, w, b: TF.gelu(TF.linear(x, w, b)), flops.get, "GFLOP/s"))
    return cases


# The GPU rows of the fully fused MLP: (batch, in, hidden width, hidden layers, out), ReLU.
FUSED_MLP_GPU = {"large": (1 << 20, 32, 64, 4, 16)}


def fused_mlp_gpu_cases(size, device, randn):
    if device != "cuda" or size not in FUSED_MLP_GPU:
        return []
    bsz, d_in, width, layers, d_out = FUSED_MLP_GPU[size]
    dims = [d_in] + [width] * layers + [d_out]
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        params += [randn(fan_out, fan_in, scale=fan_in ** -0.5), randn(fan_out, scale=0.1)]
    f = 2 * bsz * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    flops = {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}

    def fastops_mlp(x, *params):
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
        return torch.ops.fastops.fused_mlp(x, list(params[0::2]), list(params[1::2]), "relu",
                                           "none", save)[0]

    def torch_mlp(x, *params):
        h = x
        for i in range(0, len(params) - 2, 2):
            h = TF.relu(TF.linear(h, params[i], params[i + 1]))
        return TF.linear(h, params[-2], params[-1])

    return [Case("fused_mlp", size, f"{bsz}x{'-'.join(map(str, dims))}",
                 [randn(bsz, d_in), *params], fastops_mlp, torch_mlp, flops.get, "GFLOP/s")]


def softmax_cases(size, shapes, randn, g, device, es):
    cases = []
    if "softmax" in shapes:
        bsz, classes = shapes["softmax"]
        logits = randn(bsz, classes, scale=3.0)
        tgt = torch.randint(0, classes, (bsz,), generator=g).to(device)
        nb = bsz * classes * es
        ce = {"fwd": nb, "bwd": 2 * nb, "fwd+bwd": 3 * nb}
        cases.append(Case("cross_entropy", size, f"{bsz}x{classes}", [logits, tgt],
                          F.cross_entropy, TF.cross_entropy, ce.get, "GB/s"))
        for name in ("log_softmax", "softmax"):
            cases.append(Case(name, size, f"{bsz}x{classes}", [logits, 1],
                              getattr(F, name), getattr(TF, name),
                              {"fwd": 2 * nb, "bwd": 3 * nb, "fwd+bwd": 5 * nb}.get, "GB/s"))
    return cases


def margin_cases(size, shapes, randn, g, device, es):
    """multi_margin_loss (p=1) on (batch, classes) scores: the forward reads the scores and the
    targets, the backward reads them again and writes the gradient."""
    cases = []
    if "margin" in shapes:
        bsz, classes = shapes["margin"]
        nb = bsz * classes * es
        tb = bsz * 8
        mm = {"fwd": nb + tb, "bwd": 2 * nb + tb}
        mm["fwd+bwd"] = mm["fwd"] + mm["bwd"]
        tgt = torch.randint(0, classes, (bsz,), generator=g).to(device)
        cases.append(Case("multi_margin", size, f"{bsz}x{classes}", [randn(bsz, classes), tgt],
                          F.multi_margin_loss, TF.multi_margin_loss, mm.get, "GB/s"))
    return cases


def mlp_cases(size, shapes, randn, g, device):
    """The fused MLP against the same net layer by layer: *_fused runs fastops.functional.
    fused_mlp, *_layers the fastops layers (LinearAct for each hidden layer, then linear); torch
    and torch.compile run the nn.functional layers. spiral: the 2-100-3 ReLU net of
    `fastops-train spiral` with cross entropy on top (forward + loss + backward: a scalar);
    mlp: a 64-wide ReLU net with 4 hidden layers (in 32, out 16), its output's gradient given.
    GFLOP/s counts the GEMMs: 2 per weight and row forward, 4 backward."""
    cases = []
    for kernel, dims, key in [("spiral", [2, 100, 3], "spiral"),
                              ("mlp", [32, 64, 64, 64, 64, 16], "mlp")]:
        if key not in shapes:
            continue
        bsz = shapes[key]
        params = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            params += [randn(fan_out, fan_in, scale=fan_in ** -0.5), randn(fan_out, scale=0.1)]
        x = randn(bsz, dims[0], grad=False)
        f = 2 * bsz * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
        flops = {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}
        extra = [x]
        if kernel == "spiral":
            extra.append(torch.randint(0, dims[-1], (bsz,), generator=g).to(device))

        def wrap(net, loss, kernel=kernel):
            if kernel == "spiral":
                return lambda *args: loss(net(args[-2], args[:-2]), args[-1])
            return lambda *args: net(args[-1], args[:-1])

        def fused(x, p):
            return F.fused_mlp(x, p[0::2], p[1::2], "relu")

        def layers(x, p):
            for i in range(0, len(p) - 2, 2):
                x = F.linear_act(x, p[i], p[i + 1], "relu")
            return F.linear(x, p[-2], p[-1])

        def torch_layers(x, p):
            for i in range(0, len(p) - 2, 2):
                x = TF.relu(TF.linear(x, p[i], p[i + 1]))
            return TF.linear(x, p[-2], p[-1])

        shape = f"{bsz}x{'-'.join(map(str, dims))}"
        ref = wrap(torch_layers, TF.cross_entropy)
        for suffix, net in (("fused", fused), ("layers", layers)):
            cases.append(Case(f"{kernel}_{suffix}", size, shape, [*params, *extra],
                              wrap(net, F.cross_entropy), ref, flops.get, "GFLOP/s"))
    return cases


GP_WEIGHT = 10.0


def lce_gpu_cases(size, shapes, randn, g, device):
    """Linear + cross entropy at an LLM head on the GPU, against torch's reference
    cross_entropy(linear(...)) (N x V logits in memory) and, as a second case, torch's chunked
    F.linear_cross_entropy. The peak MB column is the point as much as the time. fastops computes
    the gradients during a forward that requires them, so its bwd row is only the scaling by
    grad_loss: compare fwd+bwd."""
    cases = []
    if "lce_gpu" in shapes:
        n, h, v = shapes["lce_gpu"]
        x, w = randn(n, h), randn(v, h, scale=h ** -0.5)
        tgt = torch.randint(0, v, (n,), generator=g).to(device)
        flops = {"fwd": 2 * n * h * v, "bwd": 4 * n * h * v, "fwd+bwd": 6 * n * h * v}
        shape = f"{n}x{h}x{v}"
        cases.append(Case("linear_cross_entropy", size, shape, [x, w, tgt],
                          F.linear_cross_entropy,
                          lambda x, w, t: TF.cross_entropy(TF.linear(x, w), t),
                          flops.get, "GFLOP/s"))
        chunked = torch.nn.LinearCrossEntropyOptions()
        cases.append(Case("lce_vs_chunked", size, shape, [x, w, tgt], F.linear_cross_entropy,
                          lambda x, w, t: TF.linear_cross_entropy(x, w, t, options=chunked),
                          flops.get, "GFLOP/s"))
    return cases


def gradient_penalty(hidden_layer, last_layer, mse_loss):
    """fn(x, w1, b1, ..., wn, bn): the WGAN-GP penalty of the critic hidden_layer(...(x)) ->
    last_layer, GP_WEIGHT * mean((|d critic / d x|_2 - 1)^2), differentiable in the weights."""
    def fn(x, *params):
        x = x.detach().requires_grad_(True)
        h = x
        for i in range(0, len(params) - 2, 2):
            h = hidden_layer(h, params[i], params[i + 1])
        out = last_layer(h, params[-2], params[-1])
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        norm = grad.norm(2, dim=1)
        return GP_WEIGHT * mse_loss(norm, torch.ones_like(norm))
    return fn


def gan_gp_cases(size, shapes, randn):
    cases = []
    if "gan_gp" in shapes:
        bsz, h = shapes["gan_gp"]
        dims = [2, h, h, h, 1]
        params = []
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            params += [randn(fan_out, fan_in, scale=fan_in ** -0.5), randn(fan_out, scale=0.1)]
        # the GEMM flops of one forward; the input gradient is one more GEMM per layer, and its
        # backward two (the gradients of its input and of its weight): 4x in all
        f = 2 * bsz * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
        flops = {"fwd": 2 * f, "bwd": 2 * f, "fwd+bwd": 4 * f}
        fastops_fn = gradient_penalty(
            lambda x, w, b: F.linear_act(x, w, b, "leaky_relu", negative_slope=0.2),
            F.linear, F.mse_loss)
        torch_fn = gradient_penalty(
            lambda x, w, b: TF.leaky_relu(TF.linear(x, w, b), 0.2), TF.linear, TF.mse_loss)
        cases.append(Case("gan_gp_step", size, f"{bsz}x{'-'.join(map(str, dims))}",
                          [randn(bsz, 2, grad=False), *params], fastops_fn, torch_fn, flops.get,
                          "GFLOP/s", double_backward=True))
    return cases


# ------------------------------------------------------------------------------------------
# Timing


def sample_times(fn, device, min_run_time):
    """Seconds per call of fn, one sample per timed block, over about min_run_time."""
    if device == "cuda":
        torch.cuda.synchronize()
        # Time batches of calls between two events, so that launch gaps of short calls do not
        # count more than they would in a training loop; a batch lasts about a millisecond.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        reps = max(1, min(100, int(1e-3 / max(start.elapsed_time(end) / 1e3, 1e-6))))
        times = []
        budget = datetime.datetime.now() + datetime.timedelta(seconds=min_run_time)
        while len(times) < 4 or datetime.datetime.now() < budget:
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        return times
    # Timer runs on one thread unless told otherwise
    return list(benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                                ).blocked_autorange(min_run_time=min_run_time).times)


def time_interleaved(calls, device, min_run_time, rounds=3):
    """{provider: (p20, p50, p80) seconds per call}. Each call is warmed up (3 calls: caches,
    the allocator, first-touch page faults), then the providers take turns, `rounds` times
    min_run_time / rounds each, so that the drift of a shared machine falls on all alike."""
    for fn in calls.values():
        for _ in range(3):
            fn()
    samples = {prov: [] for prov in calls}
    for _ in range(rounds):
        for prov, fn in calls.items():
            samples[prov] += sample_times(fn, device, min_run_time / rounds)
    return {prov: tuple(float(np.percentile(t, q)) for q in (20, 50, 80))
            for prov, t in samples.items()}


def peak_memory_mb(fn, device):
    """Memory one call allocates on top of what was allocated before it. CUDA: the caching
    allocator's peak. CPU: the peak of the running sum of the tensor allocations and frees that
    the profiler records during the call (torch's CPU allocator; a kernel's own scratch
    outside tensors is not seen)."""
    if device != "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fn()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        total = peak = 0
        for _, d in deltas:
            total += d
            peak = max(peak, total)
        return peak / 2**20
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def pin_malloc():
    """Fix glibc's heap trim and mmap thresholds, which it otherwise adapts as it goes. A loop
    of large allocations can sit just on the trim threshold: every few calls the heap is then
    given back to the system and the next output faults all its pages in again. Which peer that
    hits depends on the exact sizes of its allocations, not on its kernels, so the harness fixes
    the thresholds for every peer alike. Returns whether it could (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return (libc.mallopt(m_mmap_threshold, 32 << 20) == 1  # glibc's largest
            and libc.mallopt(m_trim_threshold, 1 << 30) == 1)


def saved_mb(fn, inputs):
    """MB autograd keeps for backward after one forward: the storages of the tensors it saves
    (inputs and outputs included, each storage once). Not observable for torch.compile."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values()) / 2**20


def step(fn, inputs, mode, double_backward=False):
    """The callable that one timed call runs, for a mode."""
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd" and double_backward:
        return lambda: fn(*inputs)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    out = fn(*inputs)
    grad = torch.randn_like(out) if out.dim() > 0 else torch.ones_like(out)
    # an input the output does not depend on (the critic's last bias in a gradient penalty)
    # gets zeros
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, diff, grad, retain_graph=True,
                                           materialize_grads=True)
    return lambda: torch.autograd.grad(fn(*inputs), diff, grad, materialize_grads=True)


def ceilings(device, dtype, min_run_time):
    """Measured copy bandwidth (GB/s, read + write) and torch.matmul throughput (GFLOP/s)."""
    n = (64 if device == "cuda" else 16) * 1024 * 1024  # 256 MB (beyond any L2) / 64 MB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = time_interleaved({"copy": lambda: dst.copy_(src)}, device, min_run_time)["copy"][1]
    size = 4096 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_s = time_interleaved({"mm": lambda: torch.matmul(a, b)}, device, min_run_time)["mm"][1]
    return 2 * n * 4 / copy_s / 1e9, 2 * size ** 3 / mm_s / 1e9


# ------------------------------------------------------------------------------------------


def cpu_generation():
    """The CPU core generation where /proc/cpuinfo tells it (AMD families: virtual machines
    often hide the model name), e.g. "zen4"; "" elsewhere. Results of different generations
    go to different files."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        family, model = int(info["cpu family"]), int(info["model"])
    except (OSError, KeyError, ValueError):
        return ""
    if info.get("vendor_id") != "AuthenticAMD":
        return f"family{family}-model{model}"
    if family == 26:
        return "zen5"
    if family == 25:
        return "zen4" if model in range(0x10, 0x20) or model in range(0x60, 0x80) or \
            model in range(0xA0, 0xB0) else "zen3"
    return f"amd-family{family}"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    generation = cpu_generation()
    return (f"cpu-{platform.machine()}-{os.cpu_count()}cores-{fastops.cpu_isa()}"
            + (f"-{generation}" if generation else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if fastops.cuda_available() else "cpu")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float32, float64, float16, bfloat16")
    p.add_argument("--ops", default="", help="comma-separated kernel names (default: all)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated (default: every size of the device but lm)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/<device>.csv)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's adaptive heap thresholds (default: pinned, see pin_malloc)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in ("float32", "float64", "float16", "bfloat16"):
            p.error(f"unknown dtype {d!r}")
    # the language-model head ("lm") runs only when asked: minutes per case
    sizes = args.sizes.split(",") if args.sizes else [s for s in SIZES[args.device] if s != "lm"]
    wanted = set(filter(None, args.ops.split(",")))
    modes = args.modes.split(",")
    name = device_name(args.device)
    malloc = "glibc default"
    if not args.default_malloc and platform.system() == "Linux" and pin_malloc():
        malloc = "glibc thresholds pinned"

    providers = {"fastops": lambda c: c.fastops, "torch": lambda c: c.torch}
    if not args.no_compile:
        # A torch function is compiled afresh for every case, size and grad mode: never fall
        # back to eager because a cache limit was hit.
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 1 << 20
        # The bwd mode replays one backward with retain_graph=True, which a compiled backward
        # that donates its saved buffers (a net that saves an intermediate activation, as the
        # MLP cases do) refuses.
        torch._functorch.config.donated_buffer = False
        providers["compile"] = lambda c: torch.compile(c.torch, dynamic=False)

    rows, ceiling_lines = [], []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        bandwidth, matmul = ceilings(args.device, dtype, args.min_run_time)
        ceiling_lines.append(f"{dtype_name}: copy {bandwidth:.1f} GB/s, torch.matmul "
                             f"{matmul:.1f} GFLOP/s")
        print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"dtype {dtype_name}, malloc: {malloc}")
        print(f"ceilings: copy {bandwidth:.1f} GB/s, torch.matmul {matmul:.1f} GFLOP/s\n")
        print(f"{'kernel':<16}{'size':<7}{'mode':<9}{'fastops ms':>11}{'torch ms':>10}"
              f"{'compile ms':>11}{'vs torch':>9}{'vs comp':>8}{'achieved':>16}{'of ceil':>8}"
              f"{'peak MB':>9}{'torch MB':>9}{'saved MB':>9}{'torch':>7}")
        cases = [c for c in make_cases(args.device, dtype, sizes)
                 if not wanted or c.kernel in wanted]
        for case in cases:
            torch._dynamo.reset()
            fns = {prov: make(case) for prov, make in providers.items()
                   if not (prov == "compile" and case.double_backward)}
            fns.update(case.peers)
            saved = {prov: saved_mb(fns[prov], case.inputs) if prov != "compile" else float("nan")
                     for prov in fns}
            for mode in [m for m in modes if m in case.modes]:
                calls = {prov: step(fn, case.inputs, mode, case.double_backward)
                         for prov, fn in fns.items()}
                times = time_interleaved(calls, args.device, args.min_run_time)
                peaks = {prov: peak_memory_mb(call, args.device) for prov, call in calls.items()}
                del calls
                ours = times["fastops"][1]
                rate = case.work(mode) / ours / 1e9
                ceiling = bandwidth if case.unit == "GB/s" else matmul
                vs = {prov: times[prov][1] / ours for prov in times}
                print(f"{case.kernel:<16}{case.size:<7}{mode:<9}{ours * 1e3:>11.3f}"
                      f"{times['torch'][1] * 1e3:>10.3f}"
                      f"{times['compile'][1] * 1e3 if 'compile' in times else float('nan'):>11.3f}"
                      f"{vs['torch']:>9.2f}{vs.get('compile', float('nan')):>8.2f}"
                      f"{rate:>10.1f} {case.unit:<7}{rate / ceiling:>7.0%}"
                      f"{peaks['fastops']:>9.1f}{peaks['torch']:>9.1f}"
                      f"{saved['fastops']:>9.1f}{saved['torch']:>7.1f}")
                for prov in case.peers:
                    print(f"{'  vs ' + prov:<32}{times[prov][1] * 1e3:>10.3f}{'':>11}"
                          f"{vs[prov]:>9.2f}{'':>8}{'':>24}{'':>9}{peaks[prov]:>9.1f}"
                          f"{saved[prov]:>16.1f}")
                for prov, (p20, p50, p80) in times.items():
                    rows.append({
                        "kernel": case.kernel, "provider": prov, "mode": mode,
                        "size": case.size, "shape": case.shape, "dtype": dtype_name,
                        "p50_ms": f"{p50 * 1e3:.4f}", "p20_ms": f"{p20 * 1e3:.4f}",
                        "p80_ms": f"{p80 * 1e3:.4f}",
                        "metric": case.unit, "value": f"{case.work(mode) / p50 / 1e9:.2f}",
                        "ceiling": f"{ceiling:.2f}",
                        "fraction_of_ceiling": f"{case.work(mode) / p50 / 1e9 / ceiling:.3f}",
                        "fastops_speedup": f"{p50 / ours:.3f}",
                        "peak_mb": f"{peaks[prov]:.1f}",
                        "saved_mb": f"{saved[prov]:.2f}",
                        "device": name, "threads": torch.get_num_threads(), "malloc": malloc,
                        "torch": torch.__version__, "timestamp": stamp,
                    })
            del fns
        print()
    if not rows:
        p.error(f"no case matches --ops {args.ops!r}, --sizes {','.join(sizes)!r} and --modes "
                f"{args.modes!r} on {args.device}")
    out = args.out or os.path.join(RESULTS_DIR, f"{name}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    markdown = out[:-4] + ".md" if out.endswith(".csv") else out + ".md"
    with open(markdown, "w") as f:
        f.write(summary_markdown(rows, name, ceiling_lines))
    print(f"wrote {out} and {markdown}")
    return 0


def summary_markdown(rows, name, ceiling_lines):
    """The forward+backward rows as Markdown tables, one per dtype (for the README)."""
    by_key = {}
    for r in rows:
        key = (r["dtype"], r["kernel"], r["size"], r["shape"], r["mode"])
        by_key.setdefault(key, {})[r["provider"]] = r
    gpu = rows[0]["peak_mb"] != "nan"
    lines = [f"Forward+backward on {name} ({rows[0]['threads']} threads, torch "
             f"{torch.__version__}, malloc: {rows[0]['malloc']}); ceilings measured in the same "
             "run: "
             + "; ".join(ceiling_lines) + ". Speed-up = peer time / fastops time."
             + " Saved MB: what autograd keeps for backward after one fastops forward (torch's "
             "in brackets)."
             + (" Peak MB: memory one fastops call allocates beyond its inputs (torch's in "
                "brackets)." if gpu else "")]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        lines += ["", f"**{dtype}**", "",
                  "| kernel | shape | fastops ms | torch ms | compile ms | vs torch | vs compile "
                  "| achieved | of ceiling | saved MB |" + (" peak MB |" if gpu else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
        for (dt, kernel, _size, shape, mode), prov in by_key.items():
            if mode != "fwd+bwd" or dt != dtype:
                continue
            ours = prov["fastops"]
            comp = prov.get("compile")
            line = (f"| {kernel} | {shape} | {float(ours['p50_ms']):.3f} "
                    f"| {float(prov['torch']['p50_ms']):.3f} "
                    f"| {float(comp['p50_ms']) if comp else float('nan'):.3f} "
                    f"| {float(prov['torch']['fastops_speedup']):.2f} "
                    f"| {float(comp['fastops_speedup']) if comp else float('nan'):.2f} "
                    f"| {float(ours['value']):.1f} {ours['metric']} "
                    f"| {float(ours['fraction_of_ceiling']):.0%} "
                    f"| {float(ours['saved_mb']):.1f} ({float(prov['torch']['saved_mb']):.1f}) |")
            if gpu:
                line += f" {float(ours['peak_mb']):.0f} ({float(prov['torch']['peak_mb']):.0f}) |"
            lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
