"""The processes of a run: torchrun's process group, the global sums, and the RNG state a checkpoint keeps.

Under torchrun every process trains; NCCL connects GPUs and gloo CPUs.  Without torchrun's environment
a run is one process and these functions do nothing collective.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import cli


def init_distributed(device_name: str):
    """(rank, world size, device) — from torchrun's environment when present (NCCL on GPUs, gloo on
    CPUs), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, cli.device_from(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = cli.device_from(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
