"""Fisher stage, streamed: the empirical Fisher of every projection without the whole model in memory.

F_W = mean over batches of Σ (∂ℒ_b/∂W)², ℒ_b the batch's mean next-token loss (the dense model's).
The forward pass keeps each layer's input; the backward pass walks the layers in reverse, recomputes
layer i from its stored input with autograd on, backpropagates the gradient arriving from layer i+1,
squares the weight gradients (per batch: the square of a sum is not the sum of squares) and hands
the input gradient down. Only the sums are returned, so shards reduce by addition:
per projection Σ g² in total, per output row and per input column (a head group's share is a
slice of the rows — q/k/v — or of the columns — o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankfold.allocators.flra import BATCHES_KEY
from rankfold.workers.layers import LayerRunner
from rankfold.workers.streamed_perplexity import LOGITS_BYTES, positions_per_slice

# Largest float64 block of a squared gradient: a model up to SmolLM2's size squares each weight in one
# block (the sums as before); past it the block's size, not the matrix's, bounds the temporary.
SQUARE_BLOCK_BYTES = 64 << 20


@dataclass
class FisherSums:
    """Σ over batches of the squared batch gradient of one weight, and its row/column marginals."""

    total: torch.Tensor  # () float64
    rows: torch.Tensor   # (out,) float64
    cols: torch.Tensor   # (in,) float64

    @classmethod
    def zeros(cls, shape: torch.Size, device: torch.device | None = None) -> "FisherSums":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(()), z(shape[0]), z(shape[1]))

    def add_(self, grad: torch.Tensor) -> None:
        """Add the squares of `grad` (out, in), any float dtype, in float64 — by row blocks of at most
        SQUARE_BLOCK_BYTES, so the float64 square of a 70B down_proj gradient (1.9 GB) is never whole."""
        step = max(1, SQUARE_BLOCK_BYTES // (8 * grad.shape[1]))
        for start in range(0, grad.shape[0], step):
            squared = grad[start:start + step].to(torch.float64)  # a float64 copy of the block: squared in place
            squared.square_()
            self.rows[start:start + step].add_(squared.sum(1))
            self.cols.add_(squared.sum(0))
            self.total.add_(squared.sum())

    def to_tensors(self, path: str) -> dict[str, torch.Tensor]:
        return {f"{path}.fisher": self.total, f"{path}.fisher_rows": self.rows, f"{path}.fisher_cols": self.cols}


def head_gradient(hidden: torch.Tensor, head: nn.Module, ids: torch.Tensor,
                  logits_bytes: int = LOGITS_BYTES) -> tuple[float, torch.Tensor]:
    """ℒ = mean next-token cross-entropy of one batch from the last layer's output (batch, seq, hidden);
    returns (ℒ, ∂ℒ/∂hidden). Same loss as transformers' `model(ids, labels=ids).loss`; `head`: the
    model's OutputHead (final norm, head, soft cap). A position's loss reads its own hidden state only,
    so both are computed a slice of positions at a time: at most `logits_bytes` of float32 logits (and
    their gradient) are resident, not the batch's (4 × 2048 positions of a 256k vocabulary: 8.6 GB)."""
    width = hidden.shape[-1]
    states, targets = hidden[:, :-1].reshape(-1, width), ids[:, 1:].reshape(-1)
    grads = torch.empty_like(states)
    rows = positions_per_slice(head, logits_bytes)
    total = 0.0
    for start in range(0, targets.numel(), rows):
        piece = states[start:start + rows].detach().requires_grad_(True)
        loss = F.cross_entropy(head(piece), targets[start:start + rows], reduction="sum") / targets.numel()
        (grads[start:start + rows],) = torch.autograd.grad(loss, piece)
        total += float(loss.detach())
    grad = torch.zeros_like(hidden)
    grad[:, :-1] = grads.view(hidden.shape[0], -1, width)
    return total, grad


def layer_backward(layer: nn.Module, runner: LayerRunner, hidden: torch.Tensor, grad_out: torch.Tensor,
                   sums: dict[str, FisherSums], paths: list[str]) -> torch.Tensor:
    """Recompute `layer` on one batch's stored input, backpropagate `grad_out` (∂ℒ/∂output), add the
    squared weight gradients of `paths` to `sums`; returns ∂ℒ/∂input for the layer below. Each weight's
    gradient is summed and freed as soon as the backward pass produces it (a hook), so one gradient at a
    time is held, not the layer's (Llama-3-70B: 0.47 GB instead of 1.7 GB in bf16)."""
    weights = [layer.get_submodule(path).weight for path in paths]
    for path, weight in zip(paths, weights):
        if path not in sums:  # every path, in order: an expert no token reached keeps zeros
            sums[path] = FisherSums.zeros(weight.shape, weight.device)
    reached: set[str] = set()

    def consume(path: str):
        def hook(weight: torch.Tensor) -> None:
            sums[path].add_(weight.grad)
            weight.grad = None
            reached.add(path)
        return hook

    handles = [weight.register_post_accumulate_grad_hook(consume(path)) for path, weight in zip(paths, weights)]
    hidden = hidden.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            runner.run(layer, hidden).backward(grad_out)
    finally:
        for handle in handles:
            handle.remove()
    missing = [path for path in paths if path not in reached and ".experts." not in path]
    if missing:  # only an expert the router skipped may have no gradient
        raise RuntimeError(f"{missing[0]}: no gradient reached this weight in the backward pass")
    return hidden.grad


def prepare_for_gradients(layer: nn.Module, paths: list[str]) -> None:
    """Only the projections' weights need gradients (norms do not: they are not compressed)."""
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    for path in paths:
        layer.get_submodule(path).weight.requires_grad_(True)


def fisher_tensors(sums: dict[str, FisherSums], batches: int) -> dict[str, torch.Tensor]:
    tensors = {BATCHES_KEY: torch.tensor([batches], dtype=torch.int64)}
    for path, entry in sums.items():
        tensors.update(entry.to_tensors(path))
    return tensors


def head_group_scores(tensors: dict[str, torch.Tensor], path: str, rows: slice, head_dim: int,
                      heads_per_group: int, batches: int | None = None) -> torch.Tensor:
    """Fisher score of each group of `heads_per_group` heads of one projection (Palu's rank search):
    q/k/v heads are blocks of output rows (`rows` of the linear at `path`: all, or a fused qkv_proj's
    k or v part), o_proj's are blocks of input columns."""
    marginal = tensors[f"{path}.fisher_cols"] if path.endswith("o_proj") else tensors[f"{path}.fisher_rows"][rows]
    width = head_dim * heads_per_group
    if marginal.numel() % width:
        raise ValueError(f"{path}: {marginal.numel()} channels do not split into groups of "
                         f"{heads_per_group} heads × {head_dim}")
    batches = batches if batches is not None else int(tensors[BATCHES_KEY][0])
    return marginal.reshape(-1, width).sum(1) / batches
