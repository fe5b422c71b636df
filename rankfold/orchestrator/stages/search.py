"""search: CAP's search on the driver — the unit table from every matrix's robust PCA scores, then either
the uniform keep rule or the REINFORCE search (allocators/cap_search.py), whose losses come from forward
passes streamed layer by layer over the shard actors; the final masks go to the store per matrix.

The search saves its state (probabilities, losses, step, held-out scores and the best top-K so far)
every `save_every` steps under its digest, and a rerun of the same stage resumes from there. Every
random draw is seeded by (seed, step), so a resumed search draws what an uninterrupted one would have.

params: model {id, dtype}, method, target, sample (CalibrationSample), matrices [[layer, path, group], ...],
gram_product_dtype. inputs: rpca, and fisher when the search starts from FLRA's loss model.
"""

from __future__ import annotations

import time

import torch

from rankfold.allocators.cap_search import (
    SearchAllocation,
    UnitTable,
    baselines,
    entry_masks,
    initial_probabilities,
    project_to_budget,
    reinforce_gradient,
    smooth_gradient,
    top_k,
    uniform_keep,
    unit_table,
    uses_fisher,
    validates,
)
from rankfold.allocators.flra import fisher_scores, loss_weight
from rankfold.allocators.registry import ALLOCATORS
from rankfold.execution.progress import progress
from rankfold.execution.streaming import ShardGroup, per_shard_config, split_rows
from rankfold.jobs.spec import SpecError
from rankfold.methods.registry import sparse_entry_cost
from rankfold.methods.structure import dense_params
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import FisherSums, Masks, RobustPCA
from rankfold.orchestrator.stages.rpca import matrices
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.store import StoreError
from rankfold.workers.rpca_items import SCORE_SUFFIX
from rankfold.workers.shard import ShardConfig


def search(env: Env, stage: Stage, *, rpca: RobustPCA, fisher: FisherSums | None = None) -> tuple[dict, Artifacts]:
    """Masks of every matrix into the store. Raises SpecError (naming target.ratio) when the budget
    exceeds what every unit together costs — known only once the robust PCA units exist, so after the
    stages before it."""
    params = stage.params
    options: SearchAllocation = params["target"].allocation
    matrices = [(i, path) for i, path, _ in params["matrices"]]
    scores = {(i, p): rpca.read(i, p + SCORE_SUFFIX) for i, p in matrices}
    # FLRA's loss model: a unit's energy times its matrix's Fisher weight. The planner wires the Fisher
    # pass only when the options ask for it (a Palu KV cache may plan one for itself).
    if fisher is not None:
        scores = _fisher_weighted(env, fisher, scores)
    table = unit_table(scores, env.shapes, sparse_entry_cost(params["method"]), options.sparse_block)
    ratio = params["target"].ratio
    budget = (1.0 - ratio) * dense_params(env.shapes)
    if budget > float(table.cost.sum()):
        raise SpecError(f"target.ratio = {ratio}: the budget ({budget:.0f} parameters) exceeds every robust PCA "
                         f"unit together ({float(table.cost.sum()):.0f}); raise target.ratio or method.max_density")
    if options.rule == "uniform":
        keep, result = uniform_keep(table, ratio), {}
    else:
        keep, result = _reinforce(env, stage, rpca, table, budget)
    artifacts = {}
    for j, (i, path) in enumerate(table.matrices):
        triple_mask, entry_mask = entry_masks(table, keep, j, *table.counts(j))
        key = Masks.key_of(stage, i, path)
        artifacts[key] = env.store.put_tensors(key, {"keep_triples": triple_mask, "keep_sparse": entry_mask})
    kept = float(table.cost[keep].sum())
    result.update({"units": len(table), "budget": budget, "kept": kept, "rule": options.rule,
                   "kept_triples": int(keep[table.kind == 0].sum()),
                   "kept_entries": int(table.size[keep & (table.kind == 1)].sum())})
    return result, artifacts


def _fisher_weighted(env: Env, fisher: FisherSums, scores: dict) -> dict:
    """Scores times w = F / (m · tr G) (allocators/flra.py), so they compare across matrices."""
    weighted, sums = {}, {}
    for (i, path), tensors in scores.items():
        if i not in sums:
            sums[i] = fisher_scores(fisher.read(i))
        w = loss_weight(sums[i][path], env.shapes[i][path][0], float(tensors["gram_trace"][0]))
        weighted[i, path] = {k: v.double() * w if k.endswith("_score") else v for k, v in tensors.items()}
    return weighted


def _reinforce(env: Env, stage: Stage, rpca: RobustPCA, table: UnitTable, budget: float,
               ) -> tuple[torch.Tensor, dict]:
    options: SearchAllocation = stage.params["target"].allocation
    calibration = stage.params["sample"].ids(env.source.tokenizer())
    state_key = f"{stage.prefix(Masks.folder)}/state.safetensors"
    state = _resume(env, state_key, len(table))
    if state is None:
        state = _State(initial_probabilities(table, stage.params["target"].ratio, options.temperature, budget,
                                             options.init))
    initial, start = (state.s.clone() if state.step == 0 else None), state.step
    rows = calibration[:options.samples]
    held = calibration[options.samples:options.samples + options.holdout] if validates(options) else None
    shards = _SearchShards(env, stage, rpca, table) if start < options.steps else None
    started, running = time.perf_counter(), [float("nan")]
    status = lambda: f"loss {running[0]:.4f}"  # noqa: E731
    try:
        if held is not None and start == 0:
            _validate(state, shards, held, table, budget, options.batch_size)
        for step in progress(range(start, options.steps), "search", total=options.steps - start, status=status):
            running[0] = _step(state, shards, options, table, budget, rows, step)
            if held is not None and ((step + 1) % options.validate_every == 0 or step + 1 == options.steps):
                _validate(state, shards, held, table, budget, options.batch_size)
            if (step + 1) % options.save_every == 0 or step + 1 == options.steps:
                env.store.put_tensors(state_key, state.tensors(), metadata={"step": str(step + 1)})
    finally:
        if shards is not None:
            shards.release()
    moved = float((state.s - initial).abs().mean()) if initial is not None else None
    k = options.masks_per_step
    per_step = [sum(state.losses[i:i + k]) / k for i in range(0, len(state.losses), k)]
    keep = state.best_keep if held is not None else top_k(state.s, table.cost, budget)
    result = {"steps": options.steps, "resumed_at": start, "loss_per_step": per_step,
              "search_s": time.perf_counter() - started, "mean_probability_change": moved}
    if held is not None:
        result.update({"held_out_loss": state.validation, "kept_step": state.best_step})
    return keep, result


def _step(state: "_State", shards: "_SearchShards", options: SearchAllocation, table: UnitTable, budget: float,
          rows: torch.Tensor, step: int) -> float:
    """One REINFORCE step: masks drawn (seeded by step), their losses on the step's batch, s updated and
    projected onto the budget. Returns the step's mean loss."""
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
    masks = torch.rand(options.masks_per_step, len(table), generator=generator, dtype=torch.float64) < state.s
    batch = rows[_batch_rows(options, step, rows.shape[0])]
    losses = torch.tensor([shards.loss(batch, mask) for mask in masks], dtype=torch.float64)
    base = baselines(losses, state.losses, options.baseline_window)
    gradient = smooth_gradient(reinforce_gradient(state.s, masks, losses, base, options.estimator), table,
                               options.gradient_window)
    state.s = project_to_budget(state.s - options.lr * gradient, table.cost, budget)
    state.losses += losses.tolist()
    state.step = step + 1
    return float(losses.mean())


def _validate(state: "_State", shards: "_SearchShards", held: torch.Tensor, table: UnitTable, budget: float,
              batch_size: int) -> None:
    """The held-out score of the top-K of the probabilities at `state.step`, recorded in the state."""
    keep = top_k(state.s, table.cost, budget)
    state.validate(state.step, _held_out_loss(shards, held, keep, batch_size), keep)


def _held_out_loss(shards: "_SearchShards", held: torch.Tensor, keep: torch.Tensor, batch_size: int) -> float:
    """Mean NLL per token of the model under the unit mask `keep` on the held-out sequences, streamed in
    the search's batch size (every sequence has the same length: the batches' means average evenly)."""
    chunks = held.split(batch_size)
    return sum(shards.loss(chunk, keep) * chunk.shape[0] for chunk in chunks) / held.shape[0]


class _State:
    """What a search saves: probabilities, every mask's loss, the step, the held-out losses so far
    ([step, loss] rows) and the best top-K among them (the earliest on a tie)."""

    def __init__(self, s: torch.Tensor, losses: list[float] | None = None, step: int = 0,
                 validation: list[list[float]] | None = None, best_keep: torch.Tensor | None = None):
        self.s, self.losses, self.step = s, losses or [], step
        self.validation, self.best_keep = validation or [], best_keep

    @property
    def best_step(self) -> int:
        return int(min(self.validation, key=lambda row: row[1])[0])  # min keeps the first of equals

    def validate(self, step: int, loss: float, keep: torch.Tensor) -> None:
        if not self.validation or loss < min(row[1] for row in self.validation):
            self.best_keep = keep
        self.validation.append([step, loss])

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"s": self.s, "losses": torch.tensor(self.losses, dtype=torch.float64)}
        if self.validation:
            tensors.update({"validation": torch.tensor(self.validation, dtype=torch.float64),
                            "best_keep": self.best_keep.to(torch.uint8)})
        return tensors


def _batch_rows(options: SearchAllocation, step: int, samples: int) -> torch.Tensor:
    """The step's calibration rows: passes over a per-pass permutation of the sample, full batches only."""
    per_pass = max(1, samples // options.batch_size)
    epoch, slot = divmod(step, per_pass)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(options.seed * 7919 + epoch))
    return order[slot * options.batch_size:(slot + 1) * options.batch_size]


def _resume(env: Env, key: str, units: int) -> "_State | None":
    """The last saved state of this stage (same digest: same computation), or None: a fresh start."""
    if env.store.checksum(key) is None:
        return None
    try:
        tensors, step = env.store.get_tensors(key), int(env.store.get_metadata(key)["step"])
    except (StoreError, KeyError, ValueError):  # damaged or foreign: start over
        return None
    if tensors["s"].numel() != units:
        return None
    validation = tensors["validation"].tolist() if "validation" in tensors else []
    best = tensors["best_keep"].bool() if "best_keep" in tensors else None
    return _State(tensors["s"], tensors["losses"].tolist(), step, validation, best)


class _SearchShards:
    """Shards that run a batch through the model with masked matrices and return its mean NLL."""

    def __init__(self, env: Env, stage: Stage, rpca: RobustPCA, table: UnitTable):
        params = stage.params
        self.num_layers, self.table, self.ref = env.source.num_layers, table, env.store.ref()
        self.parts = len(split_rows(torch.zeros(params["target"].allocation.batch_size, 1), env.executor.workers))
        config = ShardConfig(env.source.location, params["model"]["dtype"], env.max_resident_mb << 20,
                             str(env.scratch), params["gram_product_dtype"])
        self.group = ShardGroup(env.executor, "search", per_shard_config(config, env.executor, self.parts), self.parts)
        self.keys: dict[int, dict[str, tuple[int, str]]] = {}
        for j, (i, path) in enumerate(table.matrices):
            self.keys.setdefault(i, {})[path] = (j, rpca.key(i, path))
        self.counts = [table.counts(j) for j in range(len(table.matrices))]

    def loss(self, batch: torch.Tensor, mask: torch.Tensor) -> float:
        parts = split_rows(batch, self.parts)
        self.group.call_each("load", [(part, part.shape[0]) for part in parts])
        for i in range(self.num_layers):
            paths = self.keys.get(i, {})
            masks = {path: entry_masks(self.table, mask, j, *self.counts[j]) for path, (j, _) in paths.items()}
            self.group.call("advance_masked", i, self.ref, {path: key for path, (_, key) in paths.items()}, masks)
        totals = self.group.call("nll")
        return sum(t for t, _ in totals) / sum(c for _, c in totals)

    def release(self) -> None:
        self.group.release()


def plan(context: PlanContext) -> tuple[dict, dict]:
    """Reads the Fisher pass only when it starts from FLRA's loss model."""
    spec = context.spec
    params = {"model": context.model, "method": spec.method, "target": spec.target, "sample": context.sample,
              "matrices": matrices(context), "gram_product_dtype": spec.calibration.gram_product_dtype}
    return params, {"rpca": "rpca", "fisher": "fisher" if uses_fisher(spec.target.allocation) else None}


register_stage(StageKind("search", search, "1", Masks,
                         producer=lambda params: ALLOCATORS.get(params["target"].allocation.kind).version, plan=plan))
