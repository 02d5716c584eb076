"""The reference trainings in short form: each runs a few epochs, the loss falls, fastops and
torch agree from the same seed; checkpoints resume exactly; mnist under DDP keeps the ranks'
parameters equal. The full-length runs (and their accuracy thresholds) are in the README."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("mlxtend")

import fastops  # noqa: E402
from fastops.models import GAN  # noqa: E402
from fastops.nn import FusedMLP  # noqa: E402
from fastops.train import boston, common, gan, mnist, spiral  # noqa: E402
from fastops.train import main as train_main  # noqa: E402

QUICK = ["--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread buys nothing, and on a busy machine torch's
    thread pool can stall for whole scheduler slices at every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_name(runs):
    return {r.name: r for r in runs}


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_spiral_backends_agree_and_loss_falls(tmp_path):
    out = str(tmp_path / "spiral")
    runs, gaps = spiral.main(["--epochs", "3", "--activations", "linear,relu,maxout,prelu",
                              "--out", out, *QUICK])
    assert len(runs) == 4 * 2 * 2
    for r in runs:
        assert len(r.losses) == 3
        assert r.losses[-1] < r.losses[0], r.name
    # the same seed, data and initial weights: the curves differ by rounding only
    assert set(gaps) == {f"{a}-{o}" for a in ("linear", "relu", "maxout", "prelu")
                         for o in ("sgd", "adam")}
    assert max(gaps.values()) < 1e-4, gaps
    named = _by_name(runs)
    for variant in gaps:
        f, t = named[f"{variant}/fastops"], named[f"{variant}/torch"]
        assert abs(f.metrics["train_accuracy"] - t.metrics["train_accuracy"]) <= 0.01
    # a two-layer net separates the arms far better than the linear model
    assert named["relu-adam/fastops"].metrics["train_accuracy"] > \
        named["linear-adam/fastops"].metrics["train_accuracy"] + 0.2

    doc = _metrics(out)
    assert doc["training"] == "spiral" and len(doc["runs"]) == len(runs)
    assert doc["config"]["loss"] == "cross_entropy"  # the default
    first = doc["runs"][0]
    assert {"name", "backend", "final_loss", "metric", "value", "seconds_per_epoch"} <= set(first)
    assert first["metric"] == "train_accuracy" and 0 <= first["value"] <= 1
    assert first["seconds_per_epoch"] > 0
    assert set(doc["loss_curve_max_diff"]) == set(gaps)
    for png in ("spiral.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_spiral_new_activations(tmp_path):
    """Hardshrink, LeakyReLU, Sigmoid and Tanh nets train and agree across backends from the
    same seed; RReLU trains too (its random slopes differ between the backends' draws)."""
    runs, gaps = spiral.main(["--epochs", "3", "--activations",
                              "hardshrink,leaky_relu,sigmoid,tanh,rrelu", "--optimizers", "adam",
                              "--no-plots", "--out", str(tmp_path / "spiral-new"), *QUICK])
    assert len(runs) == 5 * 2
    for r in runs:
        assert r.losses[-1] < r.losses[0], r.name
    assert max(v for k, v in gaps.items() if not k.startswith("rrelu")) < 1e-4, gaps


def test_spiral_multi_margin_loss(tmp_path):
    """--loss multi_margin: every variant trains on the multi-class hinge, the loss falls and
    fastops and torch agree from the same seed."""
    out = str(tmp_path / "spiral-mm")
    runs, gaps = spiral.main(["--epochs", "3", "--loss", "multi_margin", "--activations",
                              "linear,relu", "--no-plots", "--out", out, *QUICK])
    assert len(runs) == 2 * 2 * 2
    for r in runs:
        assert r.losses[-1] < r.losses[0], r.name
    assert max(gaps.values()) < 1e-4, gaps
    named = _by_name(runs)
    assert named["relu-adam/fastops"].metrics["train_accuracy"] > 0.6
    assert _metrics(out)["config"]["loss"] == "multi_margin"


def test_one_backend_starts_where_both_do(tmp_path):
    """--backend fastops alone gets the same initial weights as in --backend both."""
    args = ["--epochs", "2", "--activations", "gelu", "--optimizers", "adam", "--no-plots",
            *QUICK]
    both, _ = spiral.main(args + ["--out", str(tmp_path / "a")])
    alone, gaps = spiral.main(args + ["--backend", "fastops", "--out", str(tmp_path / "b")])
    assert gaps == {} and len(alone) == 1
    assert alone[0].losses == _by_name(both)["gelu-adam/fastops"].losses


def test_boston_loss_falls_and_update_rules_agree(tmp_path):
    out = str(tmp_path / "boston")
    runs, gaps = boston.main(["--epochs", "60", "--out", out, *QUICK])
    named = _by_name(runs)
    assert set(named) == {"manual/fastops", "manual/torch", "optim/fastops", "optim/torch"}
    for r in runs:
        assert r.losses[-1] < 0.2 * r.losses[0], r.name
        assert r.metrics["test_mse"] < 60, r.name
    # the MSE starts in the hundreds: compare the curves relative to their size
    assert max(gaps.values()) < 1e-5 * max(max(r.losses) for r in runs)
    # plain SGD is the hand-written update w -= lr * w.grad (up to rounding: it computes
    # w + (-lr) * grad)
    for b in ("fastops", "torch"):
        torch.testing.assert_close(named[f"manual/{b}"].losses, named[f"optim/{b}"].losses,
                                   rtol=1e-5, atol=0)
    doc = _metrics(out)
    assert doc["runs"][0]["metric"] == "test_mse"
    assert doc["data"].endswith("boston_housing.csv")
    assert os.path.exists(os.path.join(out, "boston.png"))


def test_boston_l1_fits_by_mean_absolute_error(tmp_path):
    out = str(tmp_path / "boston-l1")
    runs, gaps = boston.main(["--loss", "l1", "--epochs", "150", "--out", out, *QUICK])
    named = _by_name(runs)
    assert set(named) == {"manual-l1/fastops", "manual-l1/torch", "optim-l1/fastops",
                          "optim-l1/torch"}
    doc = _metrics(out)
    floor = doc["lad_test_mae"]
    assert 2 < floor < 4 and doc["loss"] == "l1"
    for r in runs:
        assert r.losses[-1] < 0.2 * r.losses[0], r.name  # an MAE that starts near 22
        assert r.metrics["test_mae"] < 1.2 * floor, (r.name, r.metrics)
    # the sign gradient amplifies rounding near the optimum, but the curves stay together
    assert max(gaps.values()) < 1e-2
    assert doc["runs"][0]["metric"] == "test_mae"
    assert os.path.exists(os.path.join(out, "boston.png"))
    # an MSE checkpoint holds no L1 run
    ck = str(tmp_path / "ck.pt")
    boston.main(["--epochs", "2", "--backend", "fastops", "--checkpoint", ck, "--no-plots",
                 "--out", str(tmp_path / "mse"), *QUICK])
    with pytest.raises(SystemExit, match="no run of --loss l1"):
        boston.main(["--loss", "l1", "--resume", ck, "--out", str(tmp_path), *QUICK])


def test_boston_takes_a_users_csv(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = x @ torch.tensor([3.0, -2.0, 0.5]) + 1.0 + 0.01 * torch.randn(200, generator=g)
    path = tmp_path / "mine.csv"
    lines = ["a,b,c,target"] + [",".join(f"{v:.6f}" for v in (*row, t))
                                for row, t in zip(x.tolist(), y.tolist())]
    path.write_text("\n".join(lines) + "\n")
    runs, _ = boston.main(["--data", str(path), "--epochs", "200", "--lr", "0.1",
                           "--backend", "fastops", "--no-plots", "--out", str(tmp_path / "o"),
                           *QUICK])
    for r in runs:
        assert r.metrics["test_mse"] < 1e-2, (r.name, r.metrics)


def test_mnist_loss_falls(tmp_path):
    out = str(tmp_path / "mnist")
    runs, gaps = mnist.main(["--epochs", "2", "--subset", "800", "--hidden", "64",
                             "--out", out, *QUICK])
    for r in runs:
        assert r.losses[-1] < r.losses[0], r.name
        assert r.metrics["test_accuracy"] > 0.5, r.metrics  # chance is 0.1
    assert gaps["mlp"] < 1e-4
    assert _metrics(out)["runs"][0]["metric"] == "test_accuracy"
    assert os.path.exists(os.path.join(out, "mnist.png"))


def test_spiral_fused_beside_the_layers(tmp_path):
    out = str(tmp_path / "spiral-fused")
    runs, gaps = spiral.main(["--epochs", "3", "--activations", "relu,tanh,prelu", "--optimizers",
                              "adam", "--fused", "--no-plots", "--out", out, *QUICK])
    named = _by_name(runs)
    # prelu has no fused form: two runs; relu and tanh three
    assert len(runs) == 3 + 3 + 2 and "prelu-adam/fused" not in named
    for act in ("relu", "tanh"):
        fused = named[f"{act}-adam/fused"]
        assert isinstance(fused.model.layers, FusedMLP)
        assert fused.losses[-1] < fused.losses[0]
        assert gaps[f"{act}-adam/fused"] < 1e-4, gaps
    doc = _metrics(out)
    assert {r["backend"] for r in doc["runs"]} == {"fastops", "torch", "fused"}


def test_mnist_fused_beside_the_layers(tmp_path):
    out = str(tmp_path / "mnist-fused")
    runs, gaps = mnist.main(["--epochs", "2", "--subset", "800", "--hidden", "32,32",
                             "--dropout", "0", "--fused", "--no-plots", "--out", out, *QUICK])
    named = _by_name(runs)
    assert set(named) == {"mlp/fastops", "mlp/torch", "mlp/fused"}
    fused = named["mlp/fused"]
    assert isinstance(fused.model.layers, FusedMLP)
    assert fused.losses[-1] < fused.losses[0]
    assert gaps["mlp/fused"] < 1e-3, gaps
    with pytest.raises(SystemExit):  # unequal widths and dropout cannot be fused
        mnist.main(["--fused", "--no-plots", "--out", out, *QUICK])


def test_mnist_fused_head_matches_unfused(tmp_path):
    """--head fused: the fastops MLP's last Linear + cross entropy run as one op; its loss curve
    matches the unfused torch run's from the same seed."""
    out = str(tmp_path / "mnist-fused")
    runs, gaps = mnist.main(["--epochs", "2", "--subset", "800", "--hidden", "64",
                             "--dropout", "0", "--head", "fused", "--out", out, *QUICK])
    assert {r.backend for r in runs} == {"fastops", "torch"}
    for r in runs:
        assert r.losses[-1] < r.losses[0], r.name
        assert r.metrics["test_accuracy"] > 0.5, r.metrics
    assert gaps["mlp"] < 1e-4


def test_gan_learns_the_ring(tmp_path):
    out = str(tmp_path / "gan")
    runs, gaps = gan.main(["--epochs", "3", "--steps", "40", "--out", out, *QUICK])
    ring = gan.Ring(8, 2.0, 0.05)
    untrained = GAN(2, 2, (128, 128)).sample(2000, generator=torch.Generator().manual_seed(0))
    start = ring.quality(untrained)["mode_distance"]  # samples near the centre: about 2
    for r in runs:
        # a GAN's losses need not fall; the samples' distance to the target's modes does
        d = r.history["mode_distance"]
        assert max(d) < 0.6 * start, (r.name, start, d)
        assert len(r.history["loss_d"]) == 3
    assert gaps["gan"] < 1e-3
    assert os.path.exists(os.path.join(out, "gan.png"))
    assert _metrics(out)["config"]["loss"] == "bce"  # the classic GAN is the default


def test_gan_two_logit_cross_entropy(tmp_path):
    """--loss ce keeps the two-class discriminator on the fused cross entropy."""
    out = str(tmp_path / "gan-ce")
    runs, gaps = gan.main(["--loss", "ce", "--epochs", "2", "--steps", "40", "--out", out,
                           *QUICK])
    assert {r.name for r in runs} == {"gan-ce/fastops", "gan-ce/torch"}
    for r in runs:
        d = r.history["mode_distance"]
        assert d[-1] < 0.8 * d[0], (r.name, d)
    assert gaps["gan-ce"] < 1e-3


def test_gan_losses_match_torch():
    """One logit and BCEWithLogits (bce), two logits and cross entropy (ce): the fastops GAN's
    losses and gradients equal its torch twin's from the same weights and batch."""
    g = torch.Generator().manual_seed(0)
    real = gan.Ring(8, 2.0, 0.05).sample(64, generator=g)
    z = torch.randn(64, 2, generator=g)
    for loss in ("bce", "ce"):
        torch.manual_seed(0)
        ours = GAN(2, 2, (16, 16), loss=loss, backend="fastops")
        ref = GAN(2, 2, (16, 16), loss=loss, backend="torch")
        ref.load_state_dict(ours.state_dict())
        assert ours.discriminator(real).shape == (64, 1 if loss == "bce" else 2)
        for model in (ours, ref):
            model.zero_grad()
            fake = model.generator(z)
            (model.discriminator_loss(real, fake.detach()) + model.generator_loss(fake)).backward()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=f"{loss} {name}")


def test_wgan_gp_runs_on_both_backends(tmp_path):
    out = str(tmp_path / "wgan")
    runs, gaps = gan.main(["--loss", "wgan-gp", "--epochs", "2", "--steps", "3",
                           "--critic-steps", "2", "--hidden", "16,16", "--batch-size", "64",
                           "--out", out, *QUICK])
    assert {r.name for r in runs} == {"wgan-gp/fastops", "wgan-gp/torch"}
    for r in runs:
        for curve in ("loss", "loss_d", "wasserstein", "gradient_penalty", "modes_covered"):
            assert len(r.history[curve]) == 2, (r.name, curve)
        assert all(v > 0 for v in r.history["gradient_penalty"]), r.name
        assert r.model.discriminator.layers[-1].out_features == 1  # a critic: one output
    # the same seed and initial weights; a few steps leave only rounding between the two
    assert gaps["wgan-gp"] < 1e-4, gaps
    doc = _metrics(out)
    assert doc["config"]["loss"] == "wgan-gp" and doc["config"]["critic_steps"] == 2
    assert {r["name"] for r in doc["runs"]} == {"wgan-gp"}
    assert doc["runs"][0]["metric"] == "modes_covered"
    for png in ("gan.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_wgan_gp_defaults_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps the help to the terminal's width
    with pytest.raises(SystemExit):
        gan.main(["--loss", "wgan-gp", "--help"])
    text = capsys.readouterr().out
    assert "(default: 5)" in text and "runs/gan-wgan-gp" in text  # the critic steps, --out
    args = ["--loss", "wgan-gp", "--steps", "2", "--critic-steps", "2", "--hidden", "8",
            "--batch-size", "32", "--backend", "torch", "--no-plots", *QUICK]
    straight, _ = gan.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")])
    ck = str(tmp_path / "ck.pt")
    gan.main(args + ["--epochs", "1", "--checkpoint", ck, "--out", str(tmp_path / "b")])
    resumed, _ = gan.main(args + ["--epochs", "2", "--resume", ck, "--out", str(tmp_path / "b")])
    assert straight[0].history == resumed[0].history
    # a checkpoint of the other loss is refused, not silently trained past
    with pytest.raises(SystemExit, match="no run of --loss bce"):
        gan.main(["--resume", ck, "--epochs", "2", "--out", str(tmp_path / "c"), *QUICK])


def _critic_step(model, real, fake, eps):
    """The penalty, the critic's loss, the penalty's gradient in the critic's weights and the
    loss's, on fixed interpolation weights eps."""
    params = dict(model.discriminator.named_parameters())
    wasserstein, gp = model.critic_terms(real, fake, eps)
    loss = gp - wasserstein
    # the penalty does not depend on the last bias, and on the others only through the
    # activations' kinks (a zero gradient): one left out of the graph counts as zeros
    gp_grads = torch.autograd.grad(gp, list(params.values()), retain_graph=True,
                                   materialize_grads=True)
    loss.backward()
    return {"gp": gp.detach(), "loss": loss.detach(),
            **{f"gp_grad.{k}": g for k, g in zip(params, gp_grads)},
            **{f"grad.{k}": p.grad for k, p in params.items()}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_wgan_gp_critic_backends_agree(dtype):
    """One critic step on the same weights and data: the penalty and every weight gradient (a
    double backward through the critic) agree between fastops and torch."""
    torch.manual_seed(0)
    reference = GAN(2, 2, (32, 32), loss="wgan-gp", backend="torch").to(dtype)
    model = reference.twin("fastops")
    g = torch.Generator().manual_seed(1)
    real = gan.Ring(8, 2.0, 0.05).sample(64, generator=g).to(dtype)
    fake = reference.sample(64, generator=g)
    eps = torch.rand(64, 1, generator=g, dtype=dtype)
    ours, theirs = _critic_step(model, real, fake, eps), _critic_step(reference, real, fake, eps)
    assert ours.keys() == theirs.keys()
    assert theirs["gp"] > 0 and theirs["gp_grad.layers.0.weight"].abs().max() > 0
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", ["fastops", "torch"])
def test_gradient_penalty_of_a_linear_critic(backend):
    """A linear critic w.x + b has gradient w everywhere: the penalty is 10 (|w| - 1)^2 and its
    gradient 20 (|w| - 1) w / |w|."""
    torch.manual_seed(0)
    model = GAN(2, 2, (), loss="wgan-gp", backend=backend).double()
    w = model.discriminator.layers[0].weight
    real, fake = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    gp = model.gradient_penalty(real, fake)
    norm = w.detach().norm()
    torch.testing.assert_close(gp.detach(), 10 * (norm - 1) ** 2)
    (grad,) = torch.autograd.grad(gp, w)
    torch.testing.assert_close(grad, 20 * (norm - 1) * w.detach() / norm)


@pytest.mark.slow
def test_wgan_gp_covers_the_ring(tmp_path):
    """The default --loss wgan-gp run: both backends cover at least 7 of the 8 modes."""
    runs, _ = gan.main(["--loss", "wgan-gp", "--no-plots", "--out", str(tmp_path), *QUICK])
    for r in runs:
        assert r.metrics["modes_covered"] >= 7, (r.name, r.metrics)


def _final_state(runs):
    return {r.name: {k: v.clone() for k, v in r.model.state_dict().items()} for r in runs}


def test_resume_gives_the_uninterrupted_result(tmp_path):
    """2 epochs with a checkpoint, then resumed to 4, ends with exactly the weights (and loss
    curve) of 4 epochs in one go: Adam's state, dropout masks and shuffles all carry over."""
    args = ["--subset", "400", "--hidden", "32", "--dropout", "0.2", "--no-plots", *QUICK]
    straight, _ = mnist.main(args + ["--epochs", "4", "--out", str(tmp_path / "a")])
    ck = str(tmp_path / "ck.pt")
    mnist.main(args + ["--epochs", "2", "--checkpoint", ck, "--out", str(tmp_path / "b")])
    saved = torch.load(ck, weights_only=True)
    assert {v["epoch"] for v in saved["runs"].values()} == {2}
    resumed, _ = mnist.main(args + ["--epochs", "4", "--resume", ck, "--out",
                                    str(tmp_path / "b")])
    a, b = _final_state(straight), _final_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    for s, r in zip(straight, resumed):
        assert s.losses == r.losses and r.timed_epochs == 4  # the time of both parts
    assert {v["epoch"] for v in torch.load(ck, weights_only=True)["runs"].values()} == {4}


def test_resume_refuses_another_trainings_checkpoint(tmp_path):
    ck = str(tmp_path / "ck.pt")
    spiral.main(["--epochs", "1", "--activations", "relu", "--optimizers", "adam",
                 "--checkpoint", ck, "--no-plots", "--out", str(tmp_path), *QUICK])
    with pytest.raises(SystemExit, match="not a checkpoint of the boston training"):
        boston.main(["--resume", ck, "--out", str(tmp_path), *QUICK])


def _subprocess_env():
    """Run `-m fastops.train` from a scratch directory, with the fastops under test on the path:
    from the source tree, `python -m` would import the unbuilt source package instead of the
    installed one."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out):
    # what torchrun would set for each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runs, _ = mnist.main(["--epochs", "2", "--subset", "600", "--hidden", "32",
                          "--backend", "fastops", "--device", "cpu", "--no-plots",
                          "--out", os.path.join(out, "run"), "--quiet"])
    torch.save({"state": _final_state(runs), "losses": runs[0].losses},
               os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_parameters_equal(tmp_path):
    out = str(tmp_path)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2)
    r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
    for name, state in r0["state"].items():
        for k, v in state.items():
            assert torch.equal(v, r1["state"][name][k]), (name, k)
    # the epoch loss is averaged over the ranks, so both report the same curve
    assert r0["losses"] == r1["losses"]
    assert r0["losses"][-1] < r0["losses"][0]
    doc = _metrics(os.path.join(out, "run"))  # written by rank 0 only
    assert doc["processes"] == 2


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The command of the README: torchrun with two CPU processes."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "fastops.train", "mnist", "--epochs", "1",
           "--subset", "600", "--device", "cpu", "--no-plots", "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test accuracy") == 1  # rank 0 prints, rank 1 does not
    assert _metrics(out)["processes"] == 2


def test_python_m_entry_point(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "fastops.train", "spiral", "--epochs", "1", "--activations",
         "relu", "--optimizers", "adam", "--no-plots", "--out", out],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "relu-adam" in proc.stdout and "train accuracy" in proc.stdout
    assert _metrics(out)["runs"][0]["name"] == "relu-adam"


def test_dispatcher(capsys):
    assert train_main([]) == 2
    assert "spiral" in capsys.readouterr().out
    assert train_main(["nope"]) == 2
    assert "unknown training 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(["boston", "--help"])
    assert e.value.code == 0
    assert "--data FILE.csv" in capsys.readouterr().out


def test_device_choice(monkeypatch):
    monkeypatch.setattr(fastops, "cuda_available", lambda: False)
    assert common.choose_device("auto", ["fastops", "torch"]) == torch.device("cpu")
    assert common.choose_device("cpu", ["fastops"]) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            common.choose_device("cuda", ["torch"])
    else:
        with pytest.raises(SystemExit, match="no CUDA kernels"):
            common.choose_device("cuda", ["fastops"])


def test_progress_bar_only_on_a_terminal(monkeypatch, tmp_path):
    def trainer(*extra):
        args = common.parser("spiral", "", 1).parse_args(["--out", str(tmp_path), *extra])
        return common.Trainer("spiral", args)

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not trainer().progress_on
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert trainer().progress_on
    assert not trainer("--quiet").progress_on


def test_results_table_layout():
    runs = [common.Run("a", "fastops", history={"loss": [1.0, 0.5]}, metrics={"acc": 0.5}),
            common.Run("a", "torch", history={"loss": [1.0, 0.25]}, metrics={"acc": 0.75})]
    text = common.results_table(runs, [("accuracy", lambda r: r.metrics["acc"], ".1%")],
                                gaps=True)
    lines = text.splitlines()
    assert lines[0].split() == ["accuracy", "loss", "gap"]
    assert lines[1].split() == ["variant", "fastops", "torch", "max", "|f-t|"]
    assert lines[3].split() == ["a", "50.0%", "75.0%", "2.5e-01"]
