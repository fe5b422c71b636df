"""The compression job: calibrate -> plan ranks -> decompose -> assemble -> evaluate -> report.

This module moves tensors between stage functions (rankfold.workers) and the artifact store; it
does no linear algebra itself. Every stage works on one layer or one matrix group, so a model is
never whole in memory: per layer, only its weights and the calibration activations are resident.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from rankfold.checkpoint import INDEX_NAME, write_index, write_shard
from rankfold.data.text import calibration_samples, load_text, tokenize
from rankfold.jobs.spec import JobSpec, SpecError
from rankfold.methods.allocation import plan_layer
from rankfold.methods.flrc import RankUnit, allocate_ranks, loss_weight
from rankfold.models.architecture import Architecture, LinearGroup
from rankfold.modules.layout import CompressedModule, member_ranks
from rankfold.models.sources import ModelSource, ModelSourceError, open_source
from rankfold.orchestrator.executor import LocalExecutor
from rankfold.orchestrator.ray_executor import ShardLost
from rankfold.orchestrator.store import ArtifactStore
from rankfold.orchestrator.tasks import (AssembleItem, DecomposeItem, SpectrumItem, run_assemble, run_decompose,
                                         run_spectrum)
from rankfold.workers.calibrate import sum_stats
from rankfold.workers.decompose import GRAM_TRACE_KEY, unit_name
from rankfold.workers.fisher import fisher_scores
from rankfold.workers.shard import SequenceShard

JOB_FILE = "job.json"
log = logging.getLogger("rankfold.pipeline")


@dataclass(frozen=True)
class ModelLayout:
    """The compressed modules of every layer: {layer index: [CompressedModule, paths inside the layer]}."""

    by_layer: dict[int, list[CompressedModule]]

    def flat(self, arch: Architecture) -> list[dict]:
        return [module.prefixed(arch.layer_prefix.format(i=i)).to_json()
                for i, modules in self.by_layer.items() for module in modules]

    def ranks(self, arch: Architecture) -> dict[str, int]:
        return {arch.layer_prefix.format(i=i) + path: rank
                for i, modules in self.by_layer.items() for path, rank in member_ranks(modules).items()}

    def in_group(self, index: int, group: LinearGroup) -> list[CompressedModule]:
        return [module for module in self.by_layer[index] if module.members[0] in group.members]


# ---------------------------------------------------------------- preflight: fail before writing


def preflight(spec: JobSpec) -> ModelSource:
    """Open the model and check every input file; a SpecError names the field and value at fault."""
    try:
        source = open_source(spec.model.source)
        arch = source.architecture
    except (ModelSourceError, ValueError) as err:
        raise SpecError(f"model.source = {spec.model.source!r}: {err}") from None
    for field, text_source in [("calibration.data", spec.calibration.data)] + [
            (f"evaluation.perplexity[{k}].data", p.data) for k, p in enumerate(spec.evaluation.perplexity)]:
        if text_source.path is not None and not Path(text_source.path).is_file():
            raise SpecError(f"{field}.path = {str(text_source.path)!r}: file not found")
    for projection in spec.target.matrices:
        arch.projection_path(projection)  # raises for a projection this architecture lacks
    return source


def prepare_output(spec: JobSpec) -> Path:
    """Create output.dir, refusing one that holds a different job (its files stay untouched)."""
    out = Path(spec.output.dir)
    job_file = out / JOB_FILE
    if job_file.is_file():
        previous = job_file.read_text()
        if previous != spec.canonical_json():
            raise SpecError(f"output.dir = {str(out)!r}: holds another job's results (see {job_file}); "
                            "choose a new folder or delete it")
    elif out.exists() and any(out.iterdir()):
        raise SpecError(f"output.dir = {str(out)!r}: exists and is not empty; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"output.dir = {str(out)!r}: cannot create ({err.strerror})") from None
    job_file.write_text(spec.canonical_json())
    return out


# ---------------------------------------------------------------- layer streaming (calibration + evaluation)


def split_rows(rows: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Contiguous, nearly equal shards (never an empty one) of (samples, seq) token ids."""
    parts = max(1, min(parts, rows.shape[0]))
    return [chunk for chunk in torch.tensor_split(rows, parts) if chunk.shape[0]]


MAX_SHARD_REBUILDS = 3


class ShardRecovery:
    """Calls shards in lockstep; a shard whose worker died is rebuilt by `replay(k)` (a new actor
    brought to the state the lost one had, from the same inputs) and its call repeated."""

    def __init__(self, executor: LocalExecutor, shards: list, stage: str, replay: Callable[[int, int], None]):
        self.executor, self.shards, self.stage, self.replay = executor, shards, stage, replay
        self.rebuilds = [0] * len(shards)

    def call(self, step: int, method: str, *args) -> list:
        partials = self.executor.call_all_settled(self.shards, method, *args)
        for k, partial in enumerate(partials):
            while isinstance(partial, ShardLost):
                self.rebuilds[k] += 1
                if self.rebuilds[k] > MAX_SHARD_REBUILDS:
                    raise RuntimeError(f"{self.stage}: shard {k} lost {self.rebuilds[k]} times "
                                       f"(last: {partial.reason}); giving up")
                log.warning("%s: shard %d lost at step %d (%s); rebuilding it", self.stage, k, step, partial.reason)
                self.replay(k, step)
                partial = self.executor.call_all_settled([self.shards[k]], method, *args)[0]
            partials[k] = partial
        return partials


def stream_shards(executor: LocalExecutor, location: str, ids: torch.Tensor, spec_dtype: str, batch_size: int,
                  stage: str, num_layers: int, budget_bytes: int, spill_dir: Path | None,
                  layout: ModelLayout | None = None, product_dtype: str = "float64",
                  on_stats: Callable[[int, dict[str, torch.Tensor]], None] | None = None):
    """Push `ids` through every layer of the model at `location`, split over the executor's
    workers (SequenceShards). With `on_stats`, each layer's input statistics, reduced over shards in
    shard order, are handed to it (calibration). Returns the shards (their activations after the
    last layer are kept only without `on_stats`) — release them with `executor.release`.

    A shard whose worker dies is rebuilt: a new actor re-embeds its sequences and replays the layers
    before the current one (no statistics), then runs it — same inputs, same results."""
    parts = split_rows(ids, executor.workers)
    init = (location, spec_dtype, budget_bytes // len(parts), str(spill_dir) if spill_dir else None, product_dtype,
            executor.threads_per_worker)
    shards = executor.actors(SequenceShard, [init] * len(parts))
    layer_layout = lambda i: [m.to_json() for m in layout.by_layer[i]] if layout else None  # noqa: E731

    def replay(k: int, upto: int) -> None:
        shards[k] = executor.actors(SequenceShard, [init])[0]
        executor.call_each([shards[k]], "load", [(parts[k], batch_size)])
        for j in range(upto):
            executor.call_each([shards[k]], "advance", [(j, layer_layout(j), False, True)])

    calls = ShardRecovery(executor, shards, stage, replay)
    try:
        executor.call_each(shards, "load", [(part, batch_size) for part in parts])
        for i in executor.steps(range(num_layers), stage):
            args = (i, layer_layout(i), on_stats is not None, not (on_stats is not None and i == num_layers - 1))
            partials = calls.call(i, "advance", *args)
            if on_stats is not None:
                on_stats(i, sum_stats(partials))
    except BaseException:
        executor.release(shards)
        raise
    return shards


def split_batches(rows: torch.Tensor, batch_size: int, parts: int) -> list[torch.Tensor]:
    """Contiguous shards made of whole batches, so a batch (whose gradient is squared) never spans
    two shards and the result does not depend on the number of workers."""
    starts = list(range(0, rows.shape[0], batch_size))
    groups = [chunk for chunk in torch.tensor_split(torch.tensor(starts), max(1, min(parts, len(starts)))) if len(chunk)]
    return [rows[int(group[0]):min(int(group[-1]) + batch_size, rows.shape[0])] for group in groups]


FISHER_DTYPE = "float32"  # squared gradients in bf16 would lose most of their digits


def stream_fisher(executor: LocalExecutor, location: str, ids: torch.Tensor, batch_size: int, num_layers: int,
                  budget_bytes: int, spill_dir: Path | None,
                  on_layer: Callable[[int, dict[str, torch.Tensor]], None]) -> dict:
    """Forward `ids` through every layer keeping each layer's input, then walk the layers in reverse
    (streamed backward): `on_layer(i, sums)` receives layer i's Fisher sums reduced over shards in
    shard order. A lost shard is replayed to the step it was at (same batches, same numbers).
    Returns {"batches", "loss"} (loss: mean over batches of the batch loss, for the log)."""
    parts = split_batches(ids, batch_size, executor.workers)
    init = (location, FISHER_DTYPE, budget_bytes // len(parts), str(spill_dir) if spill_dir else None, FISHER_DTYPE,
            executor.threads_per_worker)
    shards = executor.actors(SequenceShard, [init] * len(parts))
    forward = lambda i: (i, None, False, True, True)  # noqa: E731  (no statistics, keep the input)

    def replay(k: int, step: int) -> None:
        """Steps 0..N-1 are the forward layers, N the head, N+1.. the backward layers N-1, N-2, ..."""
        shards[k] = executor.actors(SequenceShard, [init])[0]
        executor.call_each([shards[k]], "load", [(parts[k], batch_size)])
        for j in range(min(step, num_layers)):
            executor.call_each([shards[k]], "advance", [forward(j)])
        if step > num_layers:
            executor.call_each([shards[k]], "fisher_head", [()])
        for j in range(num_layers - 1, 2 * num_layers - step, -1):
            executor.call_each([shards[k]], "fisher_backward", [(j,)])

    calls = ShardRecovery(executor, shards, "fisher", replay)
    try:
        executor.call_each(shards, "load", [(part, batch_size) for part in parts])
        for i in executor.steps(range(num_layers), "fisher forward"):
            calls.call(i, "advance", *forward(i))
        losses = calls.call(num_layers, "fisher_head")
        for i in executor.steps(range(num_layers - 1, -1, -1), "fisher backward"):
            on_layer(i, sum_stats(calls.call(2 * num_layers - i, "fisher_backward", i)))
    finally:
        executor.release(shards)
    batches = sum(-(-part.shape[0] // batch_size) for part in parts)
    return {"batches": batches, "loss": sum(losses) / batches}


def stats_key(layer: int, prefix: str = "stats") -> str:
    return f"{prefix}/layer-{layer:05d}.safetensors"


def factors_key(layer: int, group: str, prefix: str = "factors") -> str:
    return f"{prefix}/layer-{layer:05d}-{group}.safetensors"


# ---------------------------------------------------------------- stages


def calibrate(spec: JobSpec, source: ModelSource, store: ArtifactStore, executor: LocalExecutor, scratch: Path,
              prefix: str = "stats") -> tuple[int, dict[str, str]]:
    """Calibration statistics of every layer into the store under `prefix`; returns the number of
    tokens used and the artifacts written (key -> sha256)."""
    cal = spec.calibration
    samples = calibration_ids(spec, source)
    artifacts: dict[str, str] = {}

    def save_stats(i: int, tensors: dict[str, torch.Tensor]) -> None:
        key = stats_key(i, prefix)
        artifacts[key] = store.put_tensors(key, tensors)

    shards = stream_shards(executor, source.location, samples, spec.model.dtype, cal.batch_size, "calibrate",
                           source.num_layers, cal.max_resident_mb << 20, scratch,
                           product_dtype=cal.gram_product_dtype, on_stats=save_stats)
    executor.release(shards)
    return samples.numel(), artifacts


def calibration_ids(spec: JobSpec, source: ModelSource) -> torch.Tensor:
    cal = spec.calibration
    tokens = tokenize(load_text(cal.data), source.tokenizer())
    return calibration_samples(tokens, cal.num_samples, cal.seq_len, cal.seed)


def fisher_key(layer: int, prefix: str = "fisher") -> str:
    return f"{prefix}/layer-{layer:05d}.safetensors"


def fisher(spec: JobSpec, source: ModelSource, store: ArtifactStore, executor: LocalExecutor, scratch: Path,
           prefix: str = "fisher") -> tuple[dict, dict[str, str]]:
    """Fisher sums of every projection (streamed backward over the first `fisher_samples`
    calibration sequences) into the store, a layer per artifact. Returns ({batches, loss}, artifacts)."""
    allocation = spec.target.allocation
    ids = calibration_ids(spec, source)[:allocation.fisher_samples]
    artifacts: dict[str, str] = {}

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        artifacts[fisher_key(i, prefix)] = store.put_tensors(fisher_key(i, prefix), tensors)

    result = stream_fisher(executor, source.location, ids, allocation.fisher_batch_size, source.num_layers,
                           spec.calibration.max_resident_mb << 20, scratch, on_layer=save)
    return result, artifacts


def spectra_key(layer: int, group: str, prefix: str = "spectra") -> str:
    return f"{prefix}/layer-{layer:05d}-{group}.safetensors"


def spectra(source: ModelSource, layout: ModelLayout, store: ArtifactStore, executor: LocalExecutor,
            stats_prefix: str, prefix: str) -> dict[str, str]:
    """Whitened spectra of every module of `layout` (its structure; ranks are what is decided next),
    one task per (layer, input group). Returns the artifacts."""
    arch = source.architecture
    items = [SpectrumItem(source.location, arch.layer_prefix.format(i=i), group.name,
                          tuple(m.to_json() for m in layout.in_group(i, group)), store.ref(),
                          stats_key(i, stats_prefix), store.ref(), spectra_key(i, group.name, prefix))
             for i in range(source.num_layers) for group in arch.groups if layout.in_group(i, group)]
    return dict(executor.map(run_spectrum, items, "spectra"))


def fisher_ranks(spec: JobSpec, source: ModelSource, layout: ModelLayout,
                 shapes: dict[int, dict[str, tuple[int, int]]], store: ArtifactStore, fisher_prefix: str,
                 spectra_prefix: str) -> dict[int, dict[str, int]]:
    """FLRA on the driver: every module of `layout` becomes a unit (spectrum, Fisher weight, cost)
    and one budget — (1 − ratio) of the dense parameters — is split over all of them."""
    arch, allocation = source.architecture, spec.target.allocation
    units, members_of = [], {}
    for i in range(source.num_layers):
        scores = fisher_scores(store.get_tensors(fisher_key(i, fisher_prefix)))
        for group in arch.groups:
            modules = layout.in_group(i, group)
            if not modules:
                continue
            tensors = store.get_tensors(spectra_key(i, group.name, spectra_prefix))
            trace = float(tensors[GRAM_TRACE_KEY][0])
            for module in modules:
                rows = sum(shapes[i][m][0] for m in module.members)
                cols = shapes[i][module.members[0]][1]
                name = arch.layer_prefix.format(i=i) + unit_name(module)
                members_of[name] = (i, module.members)
                units.append(RankUnit(
                    name, tensors[f"{unit_name(module)}.energy"],
                    loss_weight(sum(scores[m] for m in module.members), rows, trace), rows, cols, module.skip,
                    min_rank=max(1, math.ceil(allocation.min_rank_fraction * min(rows, cols)))))
    dense = sum(m * n for layer_shapes in shapes.values() for m, n in layer_shapes.values())
    try:
        ranks = allocate_ranks(units, int((1.0 - spec.target.ratio) * dense))
    except ValueError as err:
        raise SpecError(f"target.ratio = {spec.target.ratio} with target.allocation.min_rank_fraction = "
                        f"{allocation.min_rank_fraction}: {err}") from None
    by_layer: dict[int, dict[str, int]] = {i: {} for i in shapes}
    for name, rank in ranks.items():
        i, members = members_of[name]
        by_layer[i].update({m: rank for m in members})
    return by_layer


def matrix_shapes(source: ModelSource, spec: JobSpec) -> dict[int, dict[str, tuple[int, int]]]:
    """(m, n) of every compressed matrix, read from checkpoint headers."""
    arch = source.architecture
    paths = [arch.projection_path(p) for p in spec.target.matrices]
    return {i: {path: tuple(source.shape(arch.layer_prefix.format(i=i) + path + ".weight")) for path in paths}
            for i in range(source.num_layers)}


def plan_layout(spec: JobSpec, arch: Architecture, shapes: dict[int, dict[str, tuple[int, int]]],
                ranks: dict[int, dict[str, int]] | None = None) -> ModelLayout:
    """Uniform ranks from the target ratio, or a global allocator's `ranks` (layer -> matrix -> rank)."""
    groups = [(group.name, group.members) for group in arch.groups]
    return ModelLayout({i: plan_layer(spec.method.name, groups, layer_shapes, spec.target.ratio,
                                      ranks=None if ranks is None else ranks.get(i, {}))
                        for i, layer_shapes in shapes.items()})


def decompose(spec: JobSpec, source: ModelSource, layout: ModelLayout, stats_store: ArtifactStore,
              executor: LocalExecutor, factor_store: ArtifactStore | None = None, stats_prefix: str = "stats",
              factors_prefix: str = "factors") -> tuple[dict[str, float], dict[str, str]]:
    """Factors of every compressed module, one item per (layer, input group), into `factor_store`
    (default: the stats store; separate stores let one calibration serve many methods and ratios).
    A group whose factors already exist and verify is not recomputed (keys are content-addressed).
    Returns the decompositions' diagnostics keyed by full module path, and the artifacts."""
    arch = source.architecture
    factor_store = factor_store or stats_store
    items = [DecomposeItem(source.location, spec.method, arch.layer_prefix.format(i=i), group.name,
                           tuple(m.to_json() for m in layout.in_group(i, group)), stats_store.ref(),
                           stats_key(i, stats_prefix), factor_store.ref(), factors_key(i, group.name, factors_prefix))
             for i in range(source.num_layers) for group in arch.groups if layout.in_group(i, group)]
    diagnostics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    for part, key, sha in executor.map(run_decompose, items, "decompose"):
        diagnostics.update(part)
        artifacts[key] = sha
    return diagnostics, artifacts


def assemble(spec: JobSpec, source: ModelSource, layout: ModelLayout, store: ArtifactStore, executor: LocalExecutor,
             folder: Path, factors_prefix: str = "factors", digest: str | None = None,
             checkpoint_prefix: str | None = None) -> dict[str, str]:
    """Write the compressed checkpoint into the store under `checkpoint_prefix` (a shard per layer,
    written by the workers; globals, tokenizer, config; the index last), then place it in `folder`.
    Returns the checkpoint's artifacts (key -> sha256)."""
    arch = source.architecture
    prefix = checkpoint_prefix or f"checkpoints/{digest or 'latest'}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)  # whatever was here is not a finished checkpoint now
    items = [AssembleItem(source.location, i, arch.layer_prefix.format(i=i),
                          tuple(m.to_json() for m in layout.by_layer[i]), spec.model.dtype, store.ref(),
                          tuple(factors_key(i, g.name, factors_prefix) for g in arch.groups if layout.in_group(i, g)),
                          store.ref(), f"{prefix}/layers-{i:05d}.safetensors")
             for i in range(source.num_layers)]
    shards = executor.map(run_assemble, items, "assemble")
    artifacts = {f"{prefix}/{shard.name}": shard.sha256 for shard in shards}

    staging = folder / ".staging"  # small files made here, then stored
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shards.append(write_shard(staging, "globals.safetensors", _global_tensors(source, getattr(torch, spec.model.dtype))))
    source.tokenizer().save_pretrained(staging)
    meta = {"method": spec.method.model_dump(mode="json"), "target": spec.target.model_dump(mode="json"),
            "ratio_definition": RATIO_DEFINITION, "dtype": spec.model.dtype, "layout": layout.flat(arch),
            "ranks": layout.ranks(arch), "source": spec.model.source, "digest": digest}
    write_index(staging, shards, _plain_config(source.config, spec.model.dtype), meta)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == INDEX_NAME):  # the index, last
        artifacts[f"{prefix}/{path.name}"] = store.put_file(f"{prefix}/{path.name}", path)
    shutil.rmtree(staging)
    place_checkpoint(store, artifacts, folder)
    return artifacts


def place_checkpoint(store: ArtifactStore, artifacts: dict[str, str], folder: Path) -> None:
    """Copy (local store: hard-link) a stored checkpoint into `folder`, its index last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)
    for key in sorted(artifacts, key=lambda k: k.endswith(INDEX_NAME)):
        store.fetch(key, folder / key.rsplit("/", 1)[-1])


RATIO_DEFINITION = ("compression = 1 - (parameters of the compressed matrices after / before), counted over the "
                    "target's projections in every decoder layer; embeddings, lm_head and norms not counted")


def _global_tensors(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    arch = source.architecture
    tensors = {arch.embedding_key: source.embedding().to(dtype), arch.final_norm_key: source.final_norm().to(dtype)}
    if arch.lm_head_key in source.keys():
        tensors[arch.lm_head_key] = source.lm_head().to(dtype)
    return tensors


def _plain_config(config: PretrainedConfig, dtype: str) -> PretrainedConfig:
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    return config


def perplexity(source: ModelSource, windows: torch.Tensor, dtype: str | torch.dtype, batch_size: int,
               executor: LocalExecutor, stage: str, layout: ModelLayout | None, scratch: Path) -> float:
    """Streamed perplexity over non-overlapping windows: windows split over the executor's workers,
    each streaming every layer (one resident at a time); summed NLL reduced on the driver."""
    dtype = str(dtype).removeprefix("torch.")
    shards = stream_shards(executor, source.location, windows, dtype, batch_size, stage, source.num_layers,
                           2 << 30, scratch, layout=layout)
    try:
        parts = executor.call_all(shards, "nll")
    finally:
        executor.release(shards)
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))
