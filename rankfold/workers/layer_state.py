"""Assemble stage: a layer's dense tensors + its decomposition fragments -> the compressed layer's tensors."""

from __future__ import annotations

import torch

from rankfold.modules.layout import CompressedModule


def assemble_layer_state(dense_state: dict[str, torch.Tensor], fragment: dict[str, torch.Tensor],
                         layout: list[CompressedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Drop `{member}.weight` of every compressed linear (biases and norms stay, except where the module's
    kind holds them in its own tensors: a latent KV cache's k/v biases), add the fragment's factors in
    `dtype` (integer tensors such as permutations keep their type)."""
    state = dict(dense_state)
    for module in layout:
        for member in module.members:
            if state.pop(f"{member}.weight", None) is None:
                raise KeyError(f"layer has no dense weight {member}.weight to replace")
            if not module.handler.keeps_biases:
                state.pop(f"{member}.bias", None)
    for key, value in fragment.items():
        state[key] = value
    return {key: (value.to(dtype) if value.is_floating_point() else value).contiguous() for key, value in state.items()}
