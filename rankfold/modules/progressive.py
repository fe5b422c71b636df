"""Progressive low-rank decoding inside transformers' `generate` (FLRC's PLRD; schedule math in
methods/plrd.py).

A forward pre-hook on the causal LM reads the decode step from the KV cache the call carries: an
empty cache is a prefill (generated token 0, stored rank; the prompt length is noted), otherwise the
step is t = cached tokens − prompt length + 1. Every row of a left-padded batch shares the cache
length, so the step is right for batches, and a second `generate` call starts a new cache and so
restarts at t = 0 — no global counter. A forward without a cache runs at the stored rank.

    with ProgressiveDecoding(model, per_step_ranks):
        model.generate(...)
"""

from __future__ import annotations

from torch import nn

from rankfold.modules.lowrank import LowRankLinear
from rankfold.modules.shared import SKIP_TRUNCATION, SharedProjection


def rank_modules(model: nn.Module) -> dict[str, LowRankLinear | SharedProjection]:
    """Every module whose active rank PLRD sets, by path: low-rank linears and shared projections
    (whose members follow them). ValueError for a skip layout (no nested ranks) or a dense model."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, (LowRankLinear, SharedProjection))}
    skipped = [name for name, m in found.items() if isinstance(m, SharedProjection) and m.skip]
    if skipped:
        raise ValueError(f"progressive decoding: {skipped[0]} … — {SKIP_TRUNCATION}")
    if not found:
        raise ValueError("progressive decoding needs a compressed model; this one has no low-rank modules")
    return found


class ProgressiveDecoding:
    """Applies `per_step_ranks[t]` (module path -> active rank) at generated token t; steps past the
    end keep the last entry. On exit the hook is removed and every module is back at its stored rank."""

    def __init__(self, model: nn.Module, per_step_ranks: list[dict[str, int]]):
        self.model, self.per_step = model, per_step_ranks
        self.modules = rank_modules(model)
        unknown = set().union(*per_step_ranks) - set(self.modules) if per_step_ranks else set()
        if unknown:
            raise ValueError(f"progressive decoding: no rank module {sorted(unknown)[0]!r} in this model")
        self.prompt_length = 0
        self.steps: list[int] = []  # the step of every forward, for inspection
        self._handle = None

    def step_of(self, args: tuple, kwargs: dict) -> int:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        if cache is None or cached == 0:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            tokens = tokens if tokens is not None else kwargs["inputs_embeds"]
            self.prompt_length = tokens.shape[1]
            return 0
        return cached - self.prompt_length + 1

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.step_of(args, kwargs)
        self.steps.append(t)
        ranks = self.per_step[min(t, len(self.per_step) - 1)]
        for name, target in self.modules.items():
            target.set_active_rank(ranks.get(name))

    def __enter__(self) -> "ProgressiveDecoding":
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        for target in self.modules.values():
            target.set_active_rank(None)
