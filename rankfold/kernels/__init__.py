"""Kernels of the compressed modules, with one entry point that picks the implementation.

`shared_lowrank` runs the Triton kernel on CUDA tensors and the torch path elsewhere (Triton has no
CPU backend). RANKFOLD_KERNELS=torch forces the torch path everywhere; =triton forces Triton, which on
CPU needs TRITON_INTERPRET=1 set before triton is imported (the tests do this).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from rankfold.kernels.reference import project, shared_lowrank_torch

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(x: torch.Tensor, backend: str = "auto") -> str:
    backend = os.environ.get("RANKFOLD_KERNELS", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r} (RANKFOLD_KERNELS?)")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_installed() else "torch"
    return backend


def shared_lowrank(x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
                   permutation: torch.Tensor | None = None, biases: Sequence[torch.Tensor | None] | None = None,
                   backend: str = "auto") -> list[torch.Tensor]:
    """Every member's output B_c·z + bias_c of one shared projection z = A x (or, with `permutation`,
    the skip form x[P[:r]] + A′x[P[r:]]), computing z once."""
    biases = list(biases) if biases is not None else [None] * len(bs)
    if choose_backend(x, backend) == "triton":
        from rankfold.kernels.triton_lowrank import shared_lowrank_triton  # imports triton: only when used
        return shared_lowrank_triton(x, a, bs, permutation, biases)
    z = project(x, a, permutation)
    return [torch.nn.functional.linear(z, b, bias) for b, bias in zip(bs, biases)]


__all__ = ["BACKENDS", "choose_backend", "project", "shared_lowrank", "shared_lowrank_torch", "triton_installed"]
