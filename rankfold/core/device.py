"""The device a worker's tensor work runs on (`execution.device`).

"auto" is CUDA where this process sees a GPU, else the CPU; "cuda" requires one. On a Ray worker that
requested GPUs, Ray sets CUDA_VISIBLE_DEVICES to that worker's share, so `cuda:0` is its own. The
executor tells each worker (shard or task) the name; the worker resolves it here, once, and the
stage code reads it with `worker_device()`. On the CPU every path is the one it always was: moving a
tensor to the CPU it is on is a no-op, so CPU checkpoints stay bit-identical.
"""

from __future__ import annotations

from typing import Literal

import torch

from rankfold.core.errors import BadInput

DeviceName = Literal["auto", "cpu", "cuda"]
CPU = torch.device("cpu")
_WORKER_DEVICE: torch.device = CPU


class DeviceError(BadInput, RuntimeError):
    """The requested device is not available where the work runs; the message names the field."""


def resolve_device(name: str) -> torch.device:
    """torch.device for `name` (auto | cpu | cuda) in this process. Raises DeviceError naming
    execution.device when "cuda" is asked for and CUDA is absent, ValueError for another name."""
    if name == "cpu":
        return CPU
    if name not in ("auto", "cuda"):
        raise ValueError(f"execution.device must be auto, cpu or cuda, not {name!r}")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if name == "cuda":
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"execution.device is 'cuda' but this process sees no CUDA device (torch "
                          f"{torch.__version__}, {built}); use 'auto' or 'cpu'")
    return CPU


def use_device(name: str) -> torch.device:
    """Resolve `name` and make it this process's worker device (called by a shard or a task)."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = resolve_device(name)
    return _WORKER_DEVICE


def worker_device() -> torch.device:
    """The device this process's stage work runs on (CPU until `use_device`)."""
    return _WORKER_DEVICE


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor on the CPU (a worker's results travel and are stored from host memory)."""
    return {key: value.cpu() for key, value in tensors.items()}
