"""SkipCat (see METHODS.md, "SkipCat"): a shared low-rank projection and block skipping.

Cat   — linears that read the same input are stacked, W_cat = [W_q; W_k; W_v], whitened with the
        group's S and factorised once: W_cat ≈ B A. A (r×n) is shared; B is split back per matrix.
        Parameters r(n + M), M = Σ rows.
Skip  — with the input permuted so that A = [A₁ A₂] (A₁ r×r, columns chosen by column-pivoted QR),
        B A x = (B A₁)(x₁ + A₁⁻¹A₂ x₂) = B′(x₁ + A′x₂): the r×r block becomes the identity, never
        stored nor multiplied. Parameters r(n + M − r). Exact when A₁ is invertible.

The reparameterisation is modules/skip.py; the structures (which linears share, which skip) are the
module kinds of modules/shared.py. Three methods share
this file: `skipcat`, and its ablations `cat` (sharing only) and `skip` (skipping only).

    method: {name: skipcat, max_condition: 1e4}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rankfold.methods.registry import Method, MethodOptions, register_method
from rankfold.methods.structure import SHARED, SHARED_SKIP, SKIP
from rankfold.methods.svd_llm import whitened_factor

VERSION = "1"


class _SkipCatOptions(MethodOptions):
    # Guard on cond₂(A₁) of every skip block: above it the job stops with an error naming the matrix
    # (column-pivoted QR keeps it small; a large value means fp16/bf16 forward would lose accuracy).
    max_condition: float = Field(1e4, gt=1.0)


class SkipCatOptions(_SkipCatOptions):
    """SkipCat: whitened shared projection per input group (q/k/v; gate/up) + block skipping."""

    name: Literal["skipcat"]


class CatOptions(_SkipCatOptions):
    """Ablation: the shared projection only (no skipping)."""

    name: Literal["cat"]


class SkipOptions(_SkipCatOptions):
    """Ablation: block skipping on each matrix alone (no sharing)."""

    name: Literal["skip"]


for _options, _structure in ((SkipCatOptions, SHARED_SKIP), (CatOptions, SHARED), (SkipOptions, SKIP)):
    register_method(Method(_options.model_fields["name"].annotation.__args__[0], _options, whitened_factor,
                           needs=frozenset({"gram"}), structure=_structure, version=VERSION, whitened=True))
