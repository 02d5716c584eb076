"""DistributedDataParallel set-up for runs started by torchrun (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT): gloo on the CPU, nccl on GPUs."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created: bool = False  # this process group was made here, so it is ours to destroy

    @property
    def enabled(self):
        return self.world_size > 1


def setup(device_arg, backends, choose_device, allowed, training):
    """The process's rank and device; joins the process group when there is more than one
    process (a group that already exists, e.g. made by the caller, is used as it is)."""
    world_size = dist.get_world_size() if dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=choose_device(device_arg, backends))
    if not allowed:
        raise SystemExit(f"fastops.train {training} runs in one process; of the trainings "
                         "only mnist runs under torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_arg, backends, local_rank)
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, device=device, created=created)


def teardown(info):
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value, info):
    """The mean of a float over all processes (the epoch's loss of the whole data)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / info.world_size
