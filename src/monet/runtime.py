"""Where the code runs: the device, and the process group under torchrun (the one home of both)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from monet.errors import MonetError


def distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_device(name: str | None = "auto") -> torch.device:
    """A torch device from "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N", checked: a CUDA
    request on a machine without it is a `MonetError`, not a traceback."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise MonetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MonetError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise MonetError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def start_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): joins the process group when torchrun launched us (WORLD_SIZE > 1):
    NCCL on GPUs (one per local rank), gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device
