"""Perplexity, streamed: embed the windows, run them through one layer at a time, score at the end.

The same layer loop as calibration, so a model is never whole in memory; `model_perplexity` scores a
whole in-memory transformers model the usual way and must agree (tests check both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_windows(tokens: torch.Tensor, window: int, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping windows (n, window) over the first `max_tokens` tokens (whole windows only)."""
    usable = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    count = usable // window
    if count == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, budget {max_tokens}: fewer than one window of {window}")
    return tokens[: count * window].reshape(count, window)


# float32 logits held at once while scoring: a whole 2048-token window of a 256k-vocabulary model (Gemma)
# is 2 GB of logits and as much again in cross-entropy's log-softmax, per worker
LOGITS_BYTES = 64 * 2**20


def positions_per_slice(head: nn.Module, logits_bytes: int = LOGITS_BYTES) -> int:
    """Positions whose float32 logits from `head` (an OutputHead) fit in `logits_bytes` (at least one)."""
    return max(1, logits_bytes // (4 * head.head.shape[0]))


@torch.no_grad()
def window_nll(hidden: torch.Tensor, head: nn.Module, windows: torch.Tensor,
               logits_bytes: int = LOGITS_BYTES) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens of windows (n, T, H) with
    their ids (n, T); `head`: the model's OutputHead (final norm, head, soft cap). Scored a slice of
    positions at a time, so at most `logits_bytes` of float32 logits are resident."""
    rows = positions_per_slice(head, logits_bytes)
    total, count = torch.zeros((), dtype=torch.float64, device=hidden.device), 0  # summed where the logits are: no sync a slice
    for h, ids in zip(hidden, windows):  # (T, H), (T,)
        for start in range(0, ids.numel() - 1, rows):
            stop = min(start + rows, ids.numel() - 1)
            logits = head(h[start:stop])  # (rows, vocab) float32
            total += F.cross_entropy(logits, ids[start + 1:stop + 1], reduction="sum").double()
        count += ids.numel() - 1
    return float(total), count


@torch.no_grad()
def model_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of a whole in-memory causal LM over the same windows (the reference path)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
