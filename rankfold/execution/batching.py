"""Items grouped into tasks, so a process start per task is paid per batch of small items.

On CUDA workers every Ray task runs in a process of its own (`RayExecutor.max_calls`): a worker start,
the imports and a CUDA context — seconds. A 70B model's factorisations take minutes each and keep a task
each; a small model's hundred sub-second items would spend the stage starting processes. So, largest
first, items are grouped into consecutive batches of at least total work / (BATCHES_PER_SLOT × slots),
and never more than BATCH_WORK (when the work is known): an item that large stays alone, smaller ones
share a task, run one after another. At most BATCHES_PER_SLOT batches a slot come from the first rule,
so the largest-first order still keeps every slot busy to the end; a retried task redoes its batch.
"""

from __future__ import annotations

from typing import Sequence

BATCHES_PER_SLOT = 4
# Estimated work (decompose's `group_work`: n³ + Σ m·n·min(m, n)) above which an item is a task of its own:
# seconds of a GPU's float64 factorising, more than a process start. Every group of Llama-3-70B (the
# smallest, o_proj, 1.1e12) and an 8B model's down_proj (2.9e12) stay alone; SmolLM2's (≤ 4.1e9) batch.
BATCH_WORK = 1e12


def work_batches(order: Sequence[int], work: Sequence[float] | None, slots: int) -> list[list[int]]:
    """`order` (item indices, largest work first) cut into consecutive batches, each but the last of work
    ≥ min(Σ work / (BATCHES_PER_SLOT × slots), BATCH_WORK); `work[k]`: item k's estimated work (decompose's
    unit), None: 1 each (no BATCH_WORK then). `slots`: tasks that run at once (≥ 1). Returns the batches
    in `order`'s order, none empty."""
    weights = [1.0 if work is None else float(work[k]) for k in order]
    target = sum(weights) / (BATCHES_PER_SLOT * max(slots, 1))
    if work is not None:
        target = min(target, BATCH_WORK)
    batches: list[list[int]] = []
    batch, held = [], 0.0
    for k, weight in zip(order, weights):
        batch.append(k)
        held += weight
        if held >= target:
            batches.append(batch)
            batch, held = [], 0.0
    return batches + [batch] if batch else batches
