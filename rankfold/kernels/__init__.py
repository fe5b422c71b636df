"""Kernels of the compressed modules, with one entry point that picks the implementation.

`shared_lowrank` runs the Triton kernel on CUDA tensors and the torch path elsewhere (Triton has no
CPU backend). RANKFOLD_KERNELS=torch forces the torch path everywhere; =triton forces Triton, which on
CPU needs TRITON_INTERPRET=1 set before triton is imported (the tests do this).

The Triton modules are imported by name (`triton_kernel`), never by an import statement: an exported
model folder ships copies of the torch paths only (rankfold/export/bundle.py follows import
statements), so it needs no triton and takes the torch path wherever its copy has no kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch

from rankfold.kernels.reference import project, shared_lowrank_torch

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache  # choose_backend asks on every forward; the package's files do not change
def _kernels_shipped() -> bool:
    """This package holds its Triton modules (an exported model's copy of this file does not)."""
    return importlib.util.find_spec(f"{__package__}.triton_lowrank") is not None


def triton_kernel(module: str, name: str):
    """`name` from this package's Triton module `module`, imported on first use (it imports triton)."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def choose_backend(x: torch.Tensor, backend: str = "auto") -> str:
    backend = os.environ.get("RANKFOLD_KERNELS", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r} (RANKFOLD_KERNELS?)")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_installed() and _kernels_shipped() else "torch"
    return backend


def shared_lowrank(x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
                   permutation: torch.Tensor | None = None, biases: Sequence[torch.Tensor | None] | None = None,
                   backend: str = "auto") -> list[torch.Tensor]:
    """Every member's output B_c·z + bias_c of one shared projection z = A x (or, with `permutation`,
    the skip form x[P[:r]] + A′x[P[r:]]), computing z once."""
    biases = list(biases) if biases is not None else [None] * len(bs)
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a, *bs, *biases))
    if choose_backend(x, backend) == "triton" and not tracked:  # the Triton kernel has no backward
        return triton_kernel("triton_lowrank", "shared_lowrank_triton")(x, a, bs, permutation, biases)
    z = project(x, a, permutation)
    return [torch.nn.functional.linear(z, b, bias) for b, bias in zip(bs, biases)]


__all__ = ["BACKENDS", "choose_backend", "project", "shared_lowrank", "shared_lowrank_torch", "triton_installed",
           "triton_kernel"]
