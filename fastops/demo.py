"""A quick end-to-end run: the classic 3-class spiral (generated here, no download), a two-layer
MLP built from fastops modules next to the same MLP built from torch.nn, trained with Adam from
the same seed. Prints a results table: accuracy, final loss, how far the two loss curves differ,
and the training time of each.

    python -m fastops.demo [--epochs 300] [--hidden 100] [--activation relu]
"""

import argparse
import math
import time

import torch
from torch import nn as tnn

import fastops
from fastops import nn as fnn


def spiral(points_per_class=1000, classes=3, noise=0.2, seed=0):
    """The spiral of CS231n: `classes` arms of `points_per_class` 2-D points each."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.0, 1.0, points_per_class)
        t = torch.linspace(c * 4.0, (c + 1) * 4.0, points_per_class)
        t = t + torch.randn(points_per_class, generator=g) * noise
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], dim=1))
        ys.append(torch.full((points_per_class,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


ACTIVATIONS = {
    "relu": (tnn.ReLU, fnn.ReLU), "elu": (tnn.ELU, fnn.ELU), "gelu": (tnn.GELU, fnn.GELU),
    "tanh": (tnn.Tanh, fnn.Tanh), "hardtanh": (tnn.Hardtanh, fnn.Hardtanh),
    "prelu": (tnn.PReLU, fnn.PReLU),
}


def build(backend, hidden, activation, seed):
    torch.manual_seed(seed)
    t_act, f_act = ACTIVATIONS[activation]
    if backend == "torch":
        return tnn.Sequential(tnn.Linear(2, hidden), t_act(), tnn.Linear(hidden, 3)), \
            tnn.CrossEntropyLoss()
    return tnn.Sequential(fnn.Linear(2, hidden), f_act(), fnn.Linear(hidden, 3)), \
        fnn.CrossEntropyLoss()


def train(backend, x, y, epochs, hidden, activation, seed, lr=1e-2):
    model, loss_fn = build(backend, hidden, activation, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    return {"backend": backend, "loss": losses[-1], "accuracy": accuracy, "seconds": seconds,
            "losses": losses}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    x, y = spiral(seed=args.seed)
    print(f"fastops {fastops.__version__} (CPU kernels: {fastops.cpu_isa()}), "
          f"torch {torch.__version__}")
    print(f"spiral: {len(x)} points, 3 classes; MLP 2-{args.hidden}-3 with {args.activation}, "
          f"Adam, {args.epochs} full-batch steps\n")
    runs = [train(b, x, y, args.epochs, args.hidden, args.activation, args.seed)
            for b in ("fastops", "torch")]
    gap = max(abs(a - b) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))
    print(f"{'backend':<10}{'final loss':>12}{'accuracy':>10}{'seconds':>9}")
    for r in runs:
        print(f"{r['backend']:<10}{r['loss']:>12.4f}{r['accuracy']:>10.1%}{r['seconds']:>9.2f}")
    print(f"\nlargest gap between the two loss curves: {gap:.2e}")
    if not all(math.isfinite(r["loss"]) for r in runs):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
