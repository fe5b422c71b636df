"""The anchored walk's local refinement (fitting.refine): a few Adam steps on one layer's factors.

After layer i's groups are fitted (and corrected), its factors are trained toward the dense layer's
output, Σ‖layer′(X̂) − layer(X)‖² on the fitted calibration sequences — AA-SVD's block objective (arXiv
2604.02119, §3.3; it runs 25 epochs of AdamW over every sequence, lr 1e-4, cosine) at a budget this walk
can afford: `steps` steps of `sequences` sequences. Data-parallel: each shard returns the gradient of its
rows, the partials are summed among the shards (workers/reduce.py `summed`) and the driver, holding the
layer's factors and Adam's two moments (three copies of one layer's factors), takes the step. The
factors at the start and at `checks` evenly spaced steps are scored on the held-out sequences' layer
output error; the best is kept (the start when no step helps). The start's down_proj B was refitted on
every sequence, held-out ones included (the correction's refit), so the comparison leans to the start.

Resumable: the kept tensors are stored first (one artifact), then written into each group's factor
artifact, marked refined, then that artifact deleted; a resumed walk finds the layer refined, or
finishes the rewrite from the stored tensors.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from rankfold.execution.streaming import ShardGroup
from rankfold.jobs.spec import RefineSpec
from rankfold.storage.store import ArtifactStore
from rankfold.workers.reduce import summed

log = logging.getLogger(__name__)

REFINED = "refined"  # metadata key: the artifact's factors went through the refinement


def refine_layer(shards: ShardGroup, store: ArtifactStore, i: int, layer_prefix: str, layout: list[dict],
                 keys: list[str], pending: str, spec: RefineSpec) -> tuple[dict, dict[str, str]]:
    """Layer i's factors (its groups' artifacts `keys`, modules `layout`) refined in place. `pending`:
    where the kept tensors wait while the artifacts are rewritten. Returns (diagnostics, {key: sha256} of
    the rewritten artifacts); diagnostics: `refine_heldout_ratio` (the kept factors' held-out layer-output
    error over the start's) and `refine_step` (0: the start kept), under the layer's prefix."""
    if all(store.get_metadata(key).get(REFINED) == "1" for key in keys):
        if store.exists(pending):  # stopped after the rewrite, before the delete
            store.delete(pending)
        return {}, {key: store.checksum(key) for key in keys}
    if not store.exists(pending):
        start = {name: tensor for key in keys for name, tensor in store.get_tensors(key).items()
                 if tensor.is_floating_point()}
        kept, step, ratio = descend(shards, i, layout, store.ref(), keys, start, spec)
        found = {"refine_heldout_ratio": {"": ratio}, "refine_step": {"": step}}  # "": the layer
        log.info("layer %d refined: step %d of %d kept, held-out layer-output error %.4f× the start's", i, step,
                 spec.steps, ratio)
        store.put_tensors(pending, kept, metadata={"diagnostics": json.dumps(found)})
    found = json.loads(store.get_metadata(pending)["diagnostics"])
    shas = _rewrite(store, keys, store.get_tensors(pending), found)
    store.delete(pending)
    return {quantity: {layer_prefix + path: value for path, value in values.items()}
            for quantity, values in found.items()}, shas


def descend(shards: ShardGroup, i: int, layout: list[dict], ref, keys: list[str],
            start: dict[str, torch.Tensor], spec: RefineSpec) -> tuple[dict[str, torch.Tensor], int, float]:
    """(the kept tensors, their step, their held-out error over the start's): Adam at `spec.lr` × rate(step),
    float32 master copies of `start` (the model dtype's on the shards)."""
    params = {name: tensor.float().clone() for name, tensor in start.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=spec.lr)
    rows = max(1, math.ceil(spec.sequences / len(shards.shards)))
    checks = check_points(spec.steps, spec.checks)
    first = best = _heldout_error(shards, i, layout, ref, keys, start)
    kept, kept_step = start, 0
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * rate(step, spec.steps)
        sums = shards.call_reduced("refine_gradients", i, layout, ref, keys, _shipped(params, start), step, rows,
                                   reduce=summed, item=None, record=False)
        tokens = float(sums["refine.tokens"][0])
        log.debug("layer %d refine step %d: fitted error %.6g a token", i, step, float(sums["refine.error"][0]) / tokens)
        for name, tensor in params.items():
            grad = sums.get(f"grad.{name}")
            tensor.grad = None if grad is None else grad / tokens  # a buffer (no gradient) stays as it is
        optimizer.step()
        if step + 1 in checks:
            candidate = _shipped(params, start)
            error = _heldout_error(shards, i, layout, ref, keys, candidate)
            log.debug("layer %d refine step %d: held-out error %.6g (start %.6g)", i, step + 1, error, first)
            if error < best:
                best, kept, kept_step = error, candidate, step + 1
    return kept, kept_step, (best / first if first > 0 else 1.0)


def check_points(steps: int, checks: int) -> set[int]:
    """The steps after which the factors are scored: min(checks, steps) of them, evenly spaced, the last
    after the last step."""
    count = min(checks, steps)
    return {math.ceil(steps * (j + 1) / count) for j in range(count)}


def rate(step: int, steps: int) -> float:
    """AA-SVD's schedule (its llama_adapter.finetune_layer): linear warm-up over the first 10 % of the
    steps, then a cosine from 1 down to 0.1 of the rate. Step 0's rate is >0 (a warm-up of ≥1 step)."""
    warmup = max(1, int(0.1 * steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _shipped(params: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The master copies in the stored tensors' dtypes (detached copies: the shards may hold them)."""
    return {name: tensor.detach().to(start[name].dtype).clone() for name, tensor in params.items()}


def _heldout_error(shards: ShardGroup, i: int, layout: list[dict], ref, keys: list[str],
                   params: dict[str, torch.Tensor]) -> float:
    """Σ over shards of the held-out layer-output error with layer i's factors set to `params`."""
    return sum(shards.call("heldout_output_error", i, layout, ref, keys, params, record=False))


def _rewrite(store: ArtifactStore, keys: list[str], kept: dict[str, torch.Tensor], found: dict) -> dict[str, str]:
    """Each group artifact with its tensors in `kept` replaced, its metadata kept and marked refined; the
    first also holds the refinement's diagnostics `found` (a resumed walk reads them from there)."""
    shas = {}
    for n, key in enumerate(keys):
        metadata = store.get_metadata(key)
        if metadata.get(REFINED) != "1":
            tensors = store.get_tensors(key)
            tensors.update({name: kept[name] for name in tensors if name in kept})
            if n == 0:
                metadata["diagnostics"] = json.dumps({**json.loads(metadata.get("diagnostics", "{}")), **found})
            store.put_tensors(key, tensors, metadata={**metadata, REFINED: "1"})
        shas[key] = store.checksum(key)
    return shas
