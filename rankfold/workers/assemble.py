"""Assemble stage: a layer's dense tensors + its factors -> the compressed layer's tensors."""

from __future__ import annotations

import torch


def assemble_layer_state(dense_state: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace `{path}.weight` by `{path}.A` and `{path}.B` for each factorised path; biases and norms stay."""
    state = {key: value.to(dtype) for key, value in dense_state.items()}
    for path, (b, a) in factors.items():
        if state.pop(f"{path}.weight", None) is None:
            raise KeyError(f"layer has no dense weight {path}.weight to replace")
        state[f"{path}.A"] = a.to(dtype).contiguous()
        state[f"{path}.B"] = b.to(dtype).contiguous()
    return state
