"""spiral: the classic first exercise. 3 classes x 1000 points in 2-D winding around each other,
generated here (no download). The purely linear two-layer model 2-100-3 against two-layer nets
with ReLU, ELU, GELU, PReLU, Hardtanh, Maxout, Hardshrink, LeakyReLU, RReLU, Sigmoid and Tanh,
each trained with SGD and with Adam; a table
of training accuracy per variant and a plot of the decision boundaries. The loss is cross
entropy, or with --loss multi_margin the multi-class hinge (multi_margin_loss) on the logits.

    fastops-train spiral [--epochs 50] [--activations relu,gelu] [--optimizers adam]
                         [--loss cross_entropy|multi_margin] [--fused]

--fused also trains each variant whose activation the fused MLP runs (relu, elu, gelu,
hardtanh, leaky_relu, hardshrink, sigmoid, tanh) as one fastops.nn.FusedMLP, in a third column.
"""

import torch

from fastops.models import MLP, functional
from fastops.ops.fused_mlp import FUSED_MLP_ACTIVATIONS
from fastops.train import plots
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
    results_table,
)

ACTIVATIONS = ["linear", "relu", "elu", "gelu", "prelu", "hardtanh", "maxout", "hardshrink",
               "leaky_relu", "rrelu", "sigmoid", "tanh"]
OPTIMIZERS = ["sgd", "adam"]
# --loss: the name of its function in fastops.functional and torch.nn.functional
LOSSES = {"cross_entropy": "cross_entropy", "multi_margin": "multi_margin_loss"}


def spiral_data(points_per_class=1000, classes=3, noise=0.2, seed=0):
    """`classes` spiral arms of `points_per_class` points each, radius 0..1, the angle of each
    point jittered by Gaussian noise. Returns x (N, 2) float32 and y (N,) int64."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.0, 1.0, points_per_class)
        t = torch.linspace(c * 4.0, (c + 1) * 4.0, points_per_class)
        t = t + noise * torch.randn(points_per_class, generator=g)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], dim=1))
        ys.append(torch.full((points_per_class,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def build_model(activation, hidden, backend):
    # "linear": two Linear layers and nothing between them, a linear model in disguise
    return MLP(2, [hidden], 3, activation="none" if activation == "linear" else activation,
               backend=model_backend(backend), fused=backend == FUSED)


def fusable(activation):
    return activation in FUSED_MLP_ACTIVATIONS


def make_optimizer(name, params, args):
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr_sgd, momentum=0.9)
    return torch.optim.Adam(params, lr=args.lr_adam)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_one(trainer, run, optimizer_name, x, y):
    args = trainer.args
    model = run.model
    opt = make_optimizer(optimizer_name, model.parameters(), args)
    loss_fn = getattr(functional(model_backend(run.backend)), LOSSES[args.loss])
    n = len(x)

    def epoch(_):
        # the permutation is drawn on the CPU so every device sees the same batches
        order = torch.randperm(n).to(x.device)
        return minibatch_epoch(model, opt, loss_fn, x, y, order, args.batch_size)

    trainer.fit(run, opt, epoch)
    run.metrics["train_accuracy"] = accuracy(model, x, y)
    return run


def plot_boundaries(path, runs, x, y, activations, optimizers):
    """Rows: optimizers, columns: activations; the first backend's model colours the plane,
    every backend's accuracy is in the panel title."""
    fig = plots.figure(2.2 * len(activations), 2.4 * len(optimizers))
    axes = fig.subplots(len(optimizers), len(activations), squeeze=False)
    lim = 1.15
    grid = torch.linspace(-lim, lim, 250)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    plane = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    by_variant = {}
    for r in runs:
        by_variant.setdefault(r.variant, []).append(r)
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#aec7e8", "#ff9896", "#98df8a"])
    xs, ys = x.cpu().numpy(), y.cpu().numpy()
    for i, opt in enumerate(optimizers):
        for j, act in enumerate(activations):
            ax = axes[i][j]
            members = by_variant.get(f"{act}-{opt}", [])
            if members:
                model = members[0].model
                ref = next(model.parameters())
                with torch.no_grad():
                    pred = model(plane.to(ref.device, ref.dtype)).argmax(dim=1).cpu()
                ax.contourf(gx.numpy(), gy.numpy(), pred.reshape(gx.shape).numpy(),
                            levels=[-0.5, 0.5, 1.5, 2.5], cmap=cmap, alpha=0.9)
                accs = " | ".join(f"{m.metrics['train_accuracy']:.1%}" for m in members)
                ax.set_title(f"{act}, {opt}\n{accs}", fontsize=8)
            for c in range(3):
                pts = xs[ys == c][::4]  # a quarter of the points keeps the arms readable
                ax.scatter(pts[:, 0], pts[:, 1], s=1.5, color=colors[c])
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    backends = " | ".join(m.backend for m in next(iter(by_variant.values()), []))
    fig.suptitle(f"spiral: decision boundaries of the {runs[0].backend} models; training "
                 f"accuracy of {backends}", fontsize=10)
    plots.save(fig, path)


def main(argv=None):
    # one thread: these tensors are too small for a second one to help, and on a busy
    # machine a second thread stalls every parallel region
    p = parser("spiral", __doc__.split("\n\n")[0], epochs=50, threads=1)
    p.add_argument("--activations", type=csv_list(), default=ACTIVATIONS,
                   help=f"comma-separated, of {','.join(ACTIVATIONS)}")
    p.add_argument("--optimizers", type=csv_list(), default=OPTIMIZERS,
                   help="comma-separated, of sgd,adam")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr-sgd", type=float, default=0.1, help="SGD with momentum 0.9")
    p.add_argument("--lr-adam", type=float, default=1e-2)
    p.add_argument("--points", type=int, default=1000, help="points per class")
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--loss", choices=list(LOSSES), default="cross_entropy",
                   help="cross_entropy, or multi_margin: the multi-class hinge")
    add_fused_flag(p)
    args = p.parse_args(argv)
    for a in args.activations:
        if a not in ACTIVATIONS:
            p.error(f"unknown activation {a!r}; expected some of {','.join(ACTIVATIONS)}")
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}; expected some of {','.join(OPTIMIZERS)}")

    with Trainer("spiral", args) as trainer:
        x, y = spiral_data(args.points, noise=args.noise, seed=args.seed)
        x, y = x.to(trainer.device), y.to(trainer.device)
        optimizers = {"sgd": f"SGD (lr {args.lr_sgd}, momentum 0.9)",
                      "adam": f"Adam (lr {args.lr_adam})"}
        trainer.header(
            f"spiral: {len(x)} points, 3 classes; two-layer nets 2-{args.hidden}-3, "
            f"{args.epochs} epochs of batches of {args.batch_size}, {args.loss} loss; "
            f"{' and '.join(optimizers[o] for o in args.optimizers)}; "
            f"{' and '.join(trainer.backends)}")
        runs = []
        for opt in args.optimizers:
            for act in args.activations:
                variant = f"{act}-{opt}"
                backends = [b for b in trainer.backends if b != FUSED or fusable(act)]
                models = make_models(lambda b, act=act: build_model(act, args.hidden, b),
                                     backends, args.seed, trainer.device)
                for backend, model in models.items():
                    run = Run(variant, backend, model)
                    runs.append(train_one(trainer, run, opt, x, y))
        table = results_table(runs, [
            ("train accuracy", lambda r: r.metrics["train_accuracy"], ".1%"),
            ("final loss", lambda r: r.final_loss, ".4f"),
            ("s/epoch", lambda r: r.seconds_per_epoch, ".3f"),
        ], gaps=len(trainer.backends) >= 2)
        gaps = trainer.finish(runs, table)
        if trainer.plots:
            plot_boundaries(trainer.out_path("spiral.png"), runs, x, y, args.activations,
                            args.optimizers)
            plots.loss_curves(trainer.out_path("loss.png"), runs, "spiral",
                              group=lambda r: r.variant.rsplit("-", 1)[1],
                              color=lambda r: r.variant.rsplit("-", 1)[0])
        return runs, gaps


if __name__ == "__main__":
    main()
