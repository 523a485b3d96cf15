"""Rank and world size: from torchrun's environment, or from --rank/--world-size for job arrays."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    torchrun: bool = False  # a process group exists (collectives work)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve(rank: int | None = None, world_size: int | None = None) -> DistEnv:
    """torchrun's RANK/WORLD_SIZE win; explicit flags describe an independent job array."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if rank is not None or world_size is not None:
            raise UserError("--rank/--world-size are for job arrays; under torchrun they come from the environment", "--rank")
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)
    ws = 1 if world_size is None else world_size
    r = 0 if rank is None else rank
    if ws < 1 or not 0 <= r < ws:
        raise UserError(f"rank {r} is not within world size {ws}", "--rank")
    return DistEnv(r, ws, 0, False)


def resolve_device(device: str, env: DistEnv, where: str = "--device") -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.removeprefix("cuda")
        if index and not (index.startswith(":") and index[1:].isdecimal()):
            raise UserError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)", where)
        if not torch.cuda.is_available():
            raise UserError("CUDA was asked for but no CUDA device is available", where)
        if device == "cuda":
            device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
        elif int(index[1:]) >= torch.cuda.device_count():  # torch.cuda.set_device would raise deep inside
            raise UserError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}", where)
        torch.cuda.set_device(device)
    elif device != "cpu":
        raise UserError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)", where)
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The `auto` precision rule of every stage: bf16 autocast on a GPU, fp32 on the CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") else "fp32"


def init_process_group(env: DistEnv, device: str) -> None:
    import torch.distributed as dist

    if env.torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def barrier(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.torchrun and dist.is_initialized():
        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's object on every rank."""
    import torch.distributed as dist

    if not (env.torchrun and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.torchrun and dist.is_initialized():
        dist.destroy_process_group()
