"""Whole-model forwards that refuse to yield numbers meaning nothing.

A float16 forward that overflows gives NaN log-likelihoods, and lm-eval's argmax over NaN picks the
first choice: an accuracy equal to the share of gold answers in first place, reported as if measured.
Generation decodes garbage the same way. The streamed perplexity checks every layer's output itself
(workers/layer_statistics.py); for the evaluators that run the model whole (zero-shot, generation)
`FiniteLogits` checks every forward's logits and, when they are not finite, names the first decoder
layer whose output was not and the dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from rankfold.core.errors import NumericalError
from rankfold.models.architecture import architecture_for


class FiniteLogits:
    """Context manager: while active, a forward of `model` (a transformers causal LM) whose logits hold
    a NaN or ±inf raises NumericalError naming `where`, the first non-finite decoder layer and the
    dtype. Only the logits decide (padded rows may hold anything); the layer hooks only name the culprit."""

    def __init__(self, model: nn.Module, where: str):
        self.model, self.where = model, where
        prefix = architecture_for(model.config).layer_prefix
        self.layers = [model.get_submodule(prefix.format(i=i).rstrip("."))
                       for i in range(model.config.num_hidden_layers)]
        self.finite: list[torch.Tensor] = []  # this forward's per-layer checks, kept on the device: read only on failure
        self.handles: list = []

    def __enter__(self) -> "FiniteLogits":
        self.finite = []
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._layer_hook(index)))
        self.handles.append(self.model.register_forward_hook(self._check_logits))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _layer_hook(self, index: int):
        def hook(_module, _args, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if index == 0:
                self.finite = []  # a new forward
            self.finite.append(torch.isfinite(hidden).all())  # no bool(): a GPU sync per layer and token
        return hook

    def _check_logits(self, _module, _args, output) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        finite, self.finite = self.finite, []
        if bool(torch.isfinite(logits).all()):  # the forward's one sync
            return
        first_bad = next((index for index, ok in enumerate(finite) if not bool(ok)), None)
        layer = f"first at decoder layer {first_bad}" if first_bad is not None else "after the last layer"
        raise NumericalError(f"{self.where}: non-finite logits in the {logits.dtype} forward ({layer}); the numbers "
                             "would mean nothing — evaluate with dtype float32 or bfloat16")
