"""Reference trainings on fastops, side by side with plain PyTorch.

    python -m fastops.train NAME [flags]      (or: fastops-train NAME [flags])
    torchrun --nproc_per_node=N -m fastops.train mnist

NAME is one of spiral, boston, mnist, gan; `fastops-train NAME --help` lists its flags.
Needs the training extras (matplotlib, tqdm, mlxtend, scikit-learn): in a source checkout,
pip install --no-build-isolation ".[examples]".
"""

import importlib
import sys

TRAININGS = {
    "spiral": "3-class 2-D spiral: linear vs ReLU/ELU/GELU/PReLU/Hardtanh/Maxout, SGD and Adam",
    "boston": "linear regression on Boston housing: hand-written update vs torch.optim",
    "mnist": "MLP on the 5,000-digit MNIST sample, fused cross entropy (runs under torchrun)",
    "gan": "2-D GAN learning a ring of Gaussians (--loss ce, or wgan-gp: a gradient penalty)",
}


def usage():
    lines = ["usage: fastops-train NAME [flags]   (python -m fastops.train NAME [flags])", "",
             "trainings:"]
    lines += [f"  {name:<8}{what}" for name, what in TRAININGS.items()]
    lines += ["", "fastops-train NAME --help lists the flags of one."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TRAININGS:
        print(f"fastops-train: unknown training {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fastops.train.{name}")
    module.main(rest)
    return 0
