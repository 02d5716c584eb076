"""boston: linear regression on the Boston housing data (506 houses x 13 features, target the
median value in $1000s), the CSV that the mlxtend package ships (no download). Features are
standardised with the training statistics of an 85/15 split (random_state 73). Trained with
full-batch gradient descent on the MSE loss (or with --loss l1 on the mean absolute error)
twice: once with the hand-written update `w -= lr * w.grad` and once with torch.optim.SGD;
reports the test MSE (MAE).

    fastops-train boston [--loss mse|l1] [--epochs 500] [--lr 0.05] [--data FILE.csv]
"""

import argparse
import os

import numpy as np
import torch

from fastops.models import LinearRegression, functional
from fastops.train import plots
from fastops.train.common import Run, Trainer, make_models, parser, require, results_table

VARIANTS = ["manual", "optim"]


def bundled_csv():
    """The Boston housing CSV inside the installed mlxtend package."""
    data = require("mlxtend.data")
    path = os.path.join(os.path.dirname(data.__file__), "data", "boston_housing.csv")
    if not os.path.exists(path):
        raise SystemExit(f"the Boston housing CSV is not where mlxtend keeps it ({path}); "
                         "pass --data FILE.csv")
    return path


def read_csv(path):
    """A numeric CSV, last column the target; a header line (if any) is skipped."""
    with open(path) as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1
    table = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
    if table.shape[1] < 2 or len(table) < 4:
        raise SystemExit(f"--data {path}: need at least 4 rows and 2 columns (features, then "
                         f"the target), got {table.shape}")
    return table[:, :-1], table[:, -1]


def split_standardise(x, y, test_size, random_state):
    """Train/test split, features scaled by the training mean and standard deviation only (the
    test set must not leak into the scaling)."""
    model_selection = require("sklearn.model_selection")
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_size, random_state=random_state)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # a constant column stays constant (zero) instead of dividing by 0

    def t(a):
        return torch.tensor(a, dtype=torch.float32)

    return (t((x_train - mean) / std), t(y_train)[:, None], t((x_test - mean) / std),
            t(y_test)[:, None])


def least_squares_mse(x_train, y_train, x_test, y_test):
    """Test MSE of the exact least-squares fit, the floor gradient descent is heading for."""
    a = torch.cat([x_train, torch.ones(len(x_train), 1)], dim=1).double()
    w = torch.linalg.lstsq(a, y_train.double()).solution
    b = torch.cat([x_test, torch.ones(len(x_test), 1)], dim=1).double()
    return torch.mean((b @ w - y_test.double()) ** 2).item()


def least_absolute_deviations_mae(x_train, y_train, x_test, y_test, iterations=200):
    """Test MAE of the least-absolute-deviations fit (the minimum of the training MAE), by
    iteratively reweighted least squares from the least-squares fit: the floor of --loss l1."""
    a = torch.cat([x_train, torch.ones(len(x_train), 1)], dim=1).double()
    y = y_train.double()
    w = torch.linalg.lstsq(a, y).solution
    for _ in range(iterations):
        scale = (a @ w - y).abs().clamp_min(1e-8).rsqrt()  # weights 1 / |residual|
        w = torch.linalg.lstsq(a * scale, y * scale).solution
    b = torch.cat([x_test, torch.ones(len(x_test), 1)], dim=1).double()
    return torch.mean((b @ w - y_test.double()).abs()).item()


# --loss: the functional loss, its name in the table and metrics, the floor, and the defaults
# that differ (the mean absolute error's gradient is a sign: a larger step, as long)
LOSSES = {
    "mse": dict(fn="mse_loss", metric="mse", name="MSE", floor=least_squares_mse, lr=0.05,
                out=os.path.join("runs", "boston"), floor_name="exact least-squares solution"),
    "l1": dict(fn="l1_loss", metric="mae", name="MAE", floor=least_absolute_deviations_mae,
               lr=0.5, out=os.path.join("runs", "boston-l1"),
               floor_name="least-absolute-deviations solution"),
}


def train_one(trainer, run, variant, data):
    args = trainer.args
    x_train, y_train, x_test, y_test = data
    model = run.model
    spec = LOSSES[args.loss]
    loss_fn = getattr(functional(run.backend), spec["fn"])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr) if variant.startswith("optim") else None

    def epoch(_):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_train), y_train)
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            # the update of every introduction to autograd, without an optimizer object
            with torch.no_grad():
                for w in model.parameters():
                    w -= args.lr * w.grad
                    w.grad = None
        return loss.item()

    trainer.fit(run, opt, epoch)
    with torch.no_grad():
        run.metrics[f"test_{spec['metric']}"] = loss_fn(model(x_test), y_test).item()
        run.metrics[f"train_{spec['metric']}"] = loss_fn(model(x_train), y_train).item()
    return run


def plot_predictions(path, runs, x_test, y_test, metric="mse"):
    """Predicted against true test values of the first run (the others lie on top of it when
    the runs agree); every run's test MSE (MAE) in the legend."""
    fig = plots.figure(5, 4.5)
    ax = fig.subplots()
    truth = y_test.cpu().numpy().ravel()
    with torch.no_grad():
        pred = runs[0].model(x_test).cpu().numpy().ravel()
    ax.scatter(truth, pred, s=12, color="C0", label=f"{runs[0].name}")
    lo, hi = float(truth.min()), float(truth.max())
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="perfect prediction")
    for r in runs:  # legend entries only
        ax.plot([], [], " ",
                label=f"{r.name}: test {metric.upper()} {r.metrics['test_' + metric]:.3f}")
    ax.set_xlabel("true median value ($1000s)")
    ax.set_ylabel("predicted")
    ax.set_title("boston: linear regression on the test set")
    ax.legend(fontsize=7, loc="upper left")
    plots.save(fig, path)


def main(argv=None):
    # --loss first: the defaults of --lr and --out follow it (and --help shows those)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--loss", choices=tuple(LOSSES), default="mse")
    spec = LOSSES[pre.parse_known_args(argv)[0].loss]
    # one thread: these tensors are too small for a second one to help, and on a busy
    # machine a second thread stalls every parallel region
    p = parser("boston", __doc__.split("\n\n")[0], epochs=500, threads=1)
    p.set_defaults(out=spec["out"])
    p.add_argument("--loss", choices=tuple(LOSSES), default="mse",
                   help="mse: mean squared error; l1: mean absolute error (the defaults of --lr "
                        "and --out follow it)")
    p.add_argument("--lr", type=float, default=spec["lr"])
    p.add_argument("--data", metavar="FILE.csv",
                   help="your own numeric CSV instead: last column the target")
    p.add_argument("--test-size", type=float, default=0.15)
    p.add_argument("--split-seed", type=int, default=73,
                   help="random_state of sklearn's train_test_split")
    args = p.parse_args(argv)
    # the MSE runs keep their names; the L1 ones are told apart (in a checkpoint too)
    variants = [v if args.loss == "mse" else f"{v}-{args.loss}" for v in VARIANTS]
    metric, name = spec["metric"], spec["name"]

    with Trainer("boston", args) as trainer:
        if trainer.checkpoint is not None and trainer.checkpoint.runs and not any(
                run.split("/")[0] in variants for run in trainer.checkpoint.runs):
            raise SystemExit(f"--resume {args.resume}: the checkpoint holds no run of "
                             f"--loss {args.loss}")
        path = args.data or bundled_csv()
        x, y = read_csv(path)
        data = split_standardise(x, y, args.test_size, args.split_seed)
        reference = spec["floor"](*data)
        data = tuple(t.to(trainer.device) for t in data)
        trainer.header(
            f"boston: {len(x)} rows x {x.shape[1]} features from {path}; "
            f"{len(data[0])} train / {len(data[2])} test; linear regression, full-batch "
            f"gradient descent, lr {args.lr}, {args.epochs} epochs, {name} loss; "
            f"{' and '.join(trainer.backends)}")
        runs = []
        for variant in variants:
            models = make_models(lambda b: LinearRegression(x.shape[1], 1, backend=b),
                                 trainer.backends, args.seed, trainer.device)
            for backend, model in models.items():
                runs.append(train_one(trainer, Run(variant, backend, model), variant, data))
        table = results_table(runs, [
            (f"test {name}", lambda r: r.metrics[f"test_{metric}"], ".3f"),
            (f"train {name}", lambda r: r.metrics[f"train_{metric}"], ".3f"),
            ("s/epoch", lambda r: r.seconds_per_epoch, ".2e"),
        ], gaps=len(trainer.backends) == 2)
        floor_key = "least_squares_test_mse" if args.loss == "mse" else "lad_test_mae"
        gaps = trainer.finish(
            runs, table, extra={floor_key: reference, "data": path, "loss": args.loss},
            notes=[f"{spec['floor_name']}: test {name} {reference:.3f}"])
        if trainer.plots:
            plots.loss_curves(trainer.out_path("loss.png"), runs, "boston", ylabel=name)
            plot_predictions(trainer.out_path("boston.png"), runs, data[2], data[3], metric)
        return runs, gaps


if __name__ == "__main__":
    main()
