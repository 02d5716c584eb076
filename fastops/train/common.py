"""Plumbing shared by the trainings: flags, seeding, device, the training loop with checkpoints,
progress bars, the results table and metrics.json."""

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

import fastops
from fastops.models import BACKENDS
from fastops.train import distributed
from fastops.train.checkpoint import Checkpoint


def require(module):
    """Import an optional dependency of the trainings, with an install hint if it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(
            f"fastops.train needs {module.split('.')[0]} ({e}); install the training extras with "
            "`pip install --no-build-isolation \".[examples]\"` (or pip install matplotlib tqdm "
            "mlxtend)") from e


# ---- flags --------------------------------------------------------------------------------------

def parser(name, description, epochs, threads=0):
    """The flags every training takes; each training adds its own. threads: the default of
    --threads (0: torch's own default)."""
    p = argparse.ArgumentParser(prog=f"fastops-train {name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=(*BACKENDS, "both"), default="both",
                   help="fastops modules, plain torch.nn, or both from the same seed, data and "
                        "initial weights")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when fastops has CUDA kernels and a GPU, else cpu")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs per run")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights, shuffling and dropout all follow from it")
    p.add_argument("--out", default=os.path.join("runs", name),
                   help="directory for metrics.json and the plots")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save model, optimizer and epoch of every run here after each epoch")
    p.add_argument("--resume", metavar="PATH",
                   help="continue from this checkpoint (and keep saving to it unless "
                        "--checkpoint names another file)")
    p.add_argument("--threads", type=int, default=threads,
                   help="CPU threads for torch and fastops (0: torch's default)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no table")
    return p


def csv_list(kind=str):
    """argparse type for a comma-separated list."""
    def parse(text):
        return [kind(t) for t in text.split(",") if t.strip()]
    return parse


# The pseudo-backend of --fused: the fastops model with its MLP fused into one
# fastops.nn.FusedMLP (models.MLP(fused=True)), trained beside the others.
FUSED = "fused"


def backends_of(args):
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    return backends + [FUSED] if getattr(args, "fused", False) else backends


def model_backend(backend):
    """The models backend of a run's backend: the fused model is a fastops model."""
    return "fastops" if backend == FUSED else backend


def add_fused_flag(p):
    p.add_argument("--fused", action="store_true",
                   help="also train the fastops model with its MLP fused into one FusedMLP (one "
                        "kernel per pass) and report it beside the others")


def choose_device(name, backends, local_rank=0):
    """--device: auto picks cuda only when the fastops build has CUDA kernels (so both backends
    can run there), cuda asks for it and says why it cannot be had."""
    if name == "auto":
        name = "cuda" if fastops.cuda_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        if ("fastops" in backends or FUSED in backends) and not fastops.cuda_available():
            raise SystemExit("--device cuda: this fastops build has no CUDA kernels; use "
                             "--backend torch or --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---- seeding ------------------------------------------------------------------------------------

def seed_all(seed):
    torch.manual_seed(seed)  # seeds the CUDA generators too


def seed_epoch(seed, epoch):
    """Reseed at the start of each epoch: shuffling and dropout of epoch e then depend only on
    (seed, e), so a resumed run replays exactly the batches an uninterrupted one would see."""
    torch.manual_seed(seed * 1_000_003 + epoch + 1)


def minibatch_epoch(model, optimizer, loss_fn, x, y, order, batch_size):
    """One pass over the samples x[order] in batches of batch_size, one optimizer step each;
    returns the mean loss over the samples."""
    total = torch.zeros((), device=x.device)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
    return (total / len(order)).item()


# ---- runs ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """One trained model: a variant (e.g. relu-adam) on one backend."""
    variant: str
    backend: str
    model: torch.nn.Module = None
    history: dict = field(default_factory=dict)  # curve name -> one value per epoch
    seconds: float = 0.0  # training time (checkpoint and evaluation left out)
    timed_epochs: int = 0
    metrics: dict = field(default_factory=dict)  # task metrics, metric name first

    @property
    def name(self):
        return f"{self.variant}/{self.backend}"

    @property
    def losses(self):
        return self.history.get("loss", [])

    @property
    def final_loss(self):
        return self.losses[-1] if self.losses else float("nan")

    @property
    def seconds_per_epoch(self):
        return self.seconds / self.timed_epochs if self.timed_epochs else float("nan")


class Trainer:
    """What one invocation of a training shares across its runs: flags, device, output
    directory, checkpoint, the process's rank."""

    def __init__(self, training, args, distributed_ok=False):
        self.training = training
        self.args = args
        self.backends = backends_of(args)
        self.dist = distributed.setup(args.device, self.backends, choose_device,
                                      allowed=distributed_ok, training=training)
        self.device = self.dist.device
        self.main = self.dist.rank == 0  # only rank 0 prints and writes
        self.out = args.out
        self.progress_on = self.main and not args.quiet and sys.stderr.isatty()
        save = args.checkpoint or args.resume
        self.checkpoint = Checkpoint(save, training, writer=self.main) if save else None
        if args.resume:
            if not os.path.exists(args.resume):
                raise SystemExit(f"--resume {args.resume}: no such file")
            self.checkpoint.load(args.resume)
        self.started = time.time()
        self._threads = torch.get_num_threads()
        if args.threads > 0:
            torch.set_num_threads(args.threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)  # leave a caller's process as it was
        distributed.teardown(self.dist)
        return False

    def log(self, *parts):
        if self.main and not self.args.quiet:
            print(*parts, flush=True)

    def header(self, what):
        self.log(f"fastops {fastops.__version__} (CPU kernels: {fastops.cpu_isa()}), torch "
                 f"{torch.__version__}, device {self.device}"
                 + (f", {self.dist.world_size} processes" if self.dist.world_size > 1 else ""))
        self.log(what)
        self.log()

    def progress(self, iterable, desc, total=None):
        tqdm = require("tqdm").tqdm
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress_on, leave=False,
                    dynamic_ncols=True, file=sys.stderr)

    def fit(self, run, optimizer, epoch_fn, epochs=None):
        """Train run.model for the epochs not yet done: epoch_fn(epoch) trains one epoch and
        returns its mean loss, or a dict of curves with "loss" among them. Resumes from and
        saves to the checkpoint when there is one. optimizer may be None (a hand-written
        update keeps no state)."""
        epochs = self.args.epochs if epochs is None else epochs
        start = 0
        if self.checkpoint is not None:
            state = self.checkpoint.get(run.name)
            if state is not None:
                run.model.load_state_dict(state["model"])
                if optimizer is not None:
                    optimizer.load_state_dict(state["optimizer"])
                run.history = {k: list(v) for k, v in state["history"].items()}
                run.seconds = state.get("seconds", 0.0)
                run.timed_epochs = state.get("timed_epochs", 0)
                start = state["epoch"]
                if start > epochs:
                    raise SystemExit(f"{run.name}: the checkpoint is at epoch {start}, past "
                                     f"--epochs {epochs}")
        bar = self.progress(range(start, epochs), desc=run.name, total=epochs - start)
        for epoch in bar:
            seed_epoch(self.args.seed, epoch)
            run.model.train()
            t0 = time.perf_counter()
            curves = epoch_fn(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            run.seconds += time.perf_counter() - t0
            run.timed_epochs += 1
            if not isinstance(curves, dict):
                curves = {"loss": curves}
            for k, v in curves.items():
                run.history.setdefault(k, []).append(float(v))
            if not math.isfinite(curves["loss"]):
                raise SystemExit(f"{run.name}: the loss is {curves['loss']} at epoch {epoch + 1}"
                                 " (training diverged; try a smaller learning rate)")
            bar.set_postfix(loss=f"{curves['loss']:.4g}")
            if self.checkpoint is not None:
                self.checkpoint.put(run.name, run.model, optimizer, epoch + 1, run.history,
                                    seconds=run.seconds, timed_epochs=run.timed_epochs)
        run.model.eval()
        return run

    # ---- output ---------------------------------------------------------------------------------

    def finish(self, runs, table, extra=None, notes=()):
        """Print the table (and notes under it), write metrics.json; returns the loss-curve
        gaps between the backends."""
        gaps = curve_gaps(runs)
        if self.main:
            if not self.args.quiet:
                print(table)
                if gaps:
                    worst = max(gaps, key=gaps.get)
                    print(f"\nlargest difference between the fastops and torch loss curves: "
                          f"{gaps[worst]:.2e} ({worst})")
                for note in notes:
                    print(note)
            write_metrics(self, runs, gaps, extra)
            self.log(f"\nwrote {os.path.join(self.out, 'metrics.json')}"
                     + ("" if self.args.no_plots else " and the plots")
                     + f" ({time.time() - self.started:.0f} s)")
        return gaps

    def out_path(self, filename):
        os.makedirs(self.out, exist_ok=True)
        return os.path.join(self.out, filename)

    @property
    def plots(self):
        return self.main and not self.args.no_plots


def make_models(build, backends, seed, device):
    """One model per backend with the same initial weights: the torch build draws them from
    `seed`, every backend loads a copy (so --backend fastops alone starts where it would in
    --backend both)."""
    seed_all(seed)
    reference = build("torch")
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    models = {}
    for backend in backends:
        model = reference if backend == "torch" else build(backend)
        model.load_state_dict(init)
        models[backend] = model.to(device)
    return models


def curve_gaps(runs):
    """variant -> max over epochs of |loss_fastops - loss_torch|, for variants run on both
    (and variant/fused -> the same for the fused model)."""
    by_variant = {}
    for r in runs:
        by_variant.setdefault(r.variant, {})[r.backend] = r.losses
    gaps = {}
    for variant, curves in by_variant.items():
        if "torch" not in curves:
            continue
        for backend, key in (("fastops", variant), (FUSED, f"{variant}/{FUSED}")):
            if backend in curves:
                gaps[key] = max((abs(x - y) for x, y in zip(curves[backend], curves["torch"])),
                                default=0.0)
    return gaps


def write_metrics(trainer, runs, gaps, extra=None):
    def clean(v):  # JSON has no NaN or inf
        return v if not isinstance(v, float) or math.isfinite(v) else None

    doc = {
        "training": trainer.training,
        "argv": sys.argv[1:],
        "config": {k: v for k, v in vars(trainer.args).items()},
        "device": str(trainer.device),
        "processes": trainer.dist.world_size,
        "versions": {"fastops": fastops.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "cpu_isa": fastops.cpu_isa()},
        "runs": [],
        "loss_curve_max_diff": {k: clean(v) for k, v in gaps.items()},
    }
    for r in runs:
        metric_name = next(iter(r.metrics), None)
        doc["runs"].append({
            "name": r.variant,
            "backend": r.backend,
            "final_loss": clean(r.final_loss),
            "metric": metric_name,
            "value": clean(r.metrics.get(metric_name)) if metric_name else None,
            "metrics": {k: clean(v) for k, v in r.metrics.items()},
            "seconds_per_epoch": clean(r.seconds_per_epoch),
            "epochs": len(r.losses),
            "curves": {k: [clean(x) for x in v] for k, v in r.history.items()},
        })
    if extra:
        doc.update(extra)
    with open(trainer.out_path("metrics.json"), "w") as f:
        json.dump(doc, f, indent=1)


# ---- the results table --------------------------------------------------------------------------

def results_table(runs, columns, gaps=None):
    """A text table, one row per variant and a column per backend for each quantity.

    columns: (header, function run -> value, format spec), e.g.
    ("train accuracy", lambda r: r.metrics["accuracy"], ".1%"). gaps=True adds the largest
    difference between the fastops and torch loss curves of each variant.
    """
    if gaps is True:
        gaps = curve_gaps(runs)
    variants, backends, cells = [], [], {}
    for r in runs:
        if r.variant not in variants:
            variants.append(r.variant)
        if r.backend not in backends:
            backends.append(r.backend)
        cells[r.variant, r.backend] = r
    groups = [(header, backends) for header, _, _ in columns]
    if gaps:
        groups.append(("loss gap", ["max |f-t|"]))
    rows = []
    for v in variants:
        row = [v]
        for _, get, spec in columns:
            for b in backends:
                run = cells.get((v, b))
                value = get(run) if run is not None else None
                row.append("-" if value is None else format(value, spec))
        if gaps:
            row.append(format(gaps[v], ".1e") if v in gaps else "-")
        rows.append(row)
    subheads = ["variant"] + [s for _, subs in groups for s in subs]
    widths = [max(len(r[i]) for r in [subheads] + rows) for i in range(len(subheads))]
    # widen the last column of a group whose title is longer than its columns together
    col = 1
    for title, subs in groups:
        span = range(col, col + len(subs))
        short = len(title) - (sum(widths[i] for i in span) + 2 * (len(subs) - 1))
        if short > 0:
            widths[span[-1]] += short
        col += len(subs)
    top = ["".ljust(widths[0])]
    col = 1
    for title, subs in groups:
        span_width = sum(widths[col:col + len(subs)]) + 2 * (len(subs) - 1)
        top.append(title.center(span_width))
        col += len(subs)

    def line(cells_):
        return "  ".join([cells_[0].ljust(widths[0])]
                         + [c.rjust(w) for c, w in zip(cells_[1:], widths[1:])]).rstrip()

    lines = ["  ".join(top).rstrip(), line(subheads)]
    lines.append("-" * max(len(s) for s in lines))
    lines += [line(r) for r in rows]
    return "\n".join(lines)
