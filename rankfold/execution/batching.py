"""Items grouped into tasks, so a process start per task is paid per batch of small items.

On CUDA workers every Ray task runs in a process of its own (`RayExecutor.max_calls`): a worker start,
the imports and a CUDA context — seconds. A 70B model's factorisations take minutes each and keep a task
each; a small model's hundred sub-second items would spend the stage starting processes. So, largest
first, items are grouped into consecutive batches of at least total work / (BATCHES_PER_SLOT × slots):
an item that large stays alone, smaller ones share a task, run one after another. Every slot still gets
BATCHES_PER_SLOT batches or more (the largest-first order keeps the tail short), and a retried task
redoes its batch only.
"""

from __future__ import annotations

from typing import Sequence

BATCHES_PER_SLOT = 4


def work_batches(order: Sequence[int], work: Sequence[float] | None, slots: int) -> list[list[int]]:
    """`order` (item indices, largest work first) cut into consecutive batches, each but the last of work
    ≥ Σ work / (BATCHES_PER_SLOT × slots); `work[k]`: item k's estimated work (any unit), None: 1 each.
    `slots`: tasks that run at once (≥ 1). Returns the batches in `order`'s order, none empty."""
    weights = [1.0 if work is None else float(work[k]) for k in order]
    target = sum(weights) / (BATCHES_PER_SLOT * max(slots, 1))
    batches: list[list[int]] = []
    batch, held = [], 0.0
    for k, weight in zip(order, weights):
        batch.append(k)
        held += weight
        if held >= target:
            batches.append(batch)
            batch, held = [], 0.0
    return batches + [batch] if batch else batches
