"""One checkpoint file per invocation, holding every run of it (e.g. relu-adam/fastops): model,
optimizer, the epochs done and the loss curves so far. Rewritten after every epoch; a finished
run stays in it, so resuming skips straight past it."""

import os

import torch

FORMAT = 1


def _cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU, so a checkpoint written on a
    GPU loads anywhere; load_state_dict moves the values back to the parameters' device."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class Checkpoint:
    def __init__(self, path, training, writer=True):
        self.path = path
        self.training = training
        self.writer = writer  # under DDP only rank 0 writes
        self.runs = {}

    def load(self, path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT or state.get("training") != self.training:
            raise SystemExit(f"--resume {path}: not a checkpoint of the {self.training} training "
                             f"(it holds {state.get('training')!r})")
        self.runs = state["runs"]

    def get(self, run_name):
        return self.runs.get(run_name)

    def put(self, run_name, model, optimizer, epoch, history, **extra):
        self.runs[run_name] = {
            "model": _cpu(model.state_dict()),
            "optimizer": _cpu(optimizer.state_dict()) if optimizer is not None else {},
            "epoch": epoch,
            "history": {k: list(v) for k, v in history.items()},
            **extra,
        }
        if self.writer:
            self.save()

    def save(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tmp = self.path + ".tmp"
        torch.save({"format": FORMAT, "training": self.training, "runs": self.runs}, tmp)
        # an interruption mid-write leaves the previous checkpoint intact
        os.replace(tmp, self.path)
