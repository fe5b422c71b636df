"""The compression job: calibrate -> plan ranks -> decompose -> assemble -> evaluate -> report.

This module moves tensors between stage functions (rankfold.workers) and the artifact store; it
does no linear algebra itself. Every stage works on one layer or one matrix group, so a model is
never whole in memory: per layer, only its weights and the calibration activations are resident.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from rankfold.checkpoint import INDEX_NAME, ShardInfo, write_index, write_shard
from rankfold.data.text import DataError, calibration_samples, load_text, tokenize
from rankfold.jobs.spec import JobSpec, SpecError
from rankfold.methods.allocation import plan_layer
from rankfold.models.architecture import Architecture, LinearGroup
from rankfold.modules.layout import CompressedModule, member_ranks
from rankfold.models.sources import ModelSource, ModelSourceError, SafetensorsSource, open_source
from rankfold.orchestrator.executor import LocalExecutor
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.store import ArtifactStore
from rankfold.workers.activations import Activations
from rankfold.workers.assemble import assemble_layer_state
from rankfold.workers.calibrate import InputStats, propagate_layer
from rankfold.workers.decompose import decompose_group
from rankfold.workers.evaluate import make_windows, window_nll
from rankfold.workers.layers import LayerRunner, embed, materialize_layer, runtime_config

JOB_FILE = "job.json"


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


def _embedded(source: ModelSource, tokens: torch.Tensor, batch_size: int, dtype: torch.dtype,
              budget_bytes: int, spill_dir: Path) -> Activations:
    table = source.embedding()
    hidden = Activations(budget_bytes, spill_dir)
    for batch in tokens.split(batch_size):
        hidden.append(embed(batch, table, dtype))
    return hidden


def stream_layers(source: ModelSource, hidden: Activations, dtype: torch.dtype, executor: LocalExecutor,
                  stage: str, layout: ModelLayout | None = None,
                  save_stats: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                  budget_bytes: int = 2 << 30, spill_dir: Path | None = None,
                  product_dtype: torch.dtype = torch.float64) -> Activations | None:
    """Push `hidden` through every layer. With `save_stats`, each layer's input statistics are handed
    to it (calibration); then the last layer's outputs are not kept."""
    arch, config = source.architecture, runtime_config(source.config)
    runner = LayerRunner(arch, config)
    groups = arch.groups if save_stats is not None else ()
    for i in executor.steps(range(source.num_layers), stage):
        layer_layout = layout.by_layer[i] if layout else None
        layer = materialize_layer(arch, config, i, source.layer_state(i), dtype, layout=layer_layout)
        last = i == source.num_layers - 1
        outputs = None if (save_stats is not None and last) else Activations(budget_bytes, spill_dir)
        stats = propagate_layer(layer, runner, hidden, outputs, groups, product_dtype)
        if save_stats is not None:
            tensors = {}
            for name, group_stats in stats.items():
                tensors.update(group_stats.to_tensors(name))
            save_stats(i, tensors)
        hidden.release()
        hidden = outputs
    return hidden


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
    tokens = tokenize(load_text(cal.data), source.tokenizer())
    samples = calibration_samples(tokens, cal.num_samples, cal.seq_len, cal.seed)
    budget = cal.max_resident_mb << 20
    dtype = getattr(torch, spec.model.dtype)
    hidden = _embedded(source, samples, cal.batch_size, dtype, budget, scratch)
    artifacts: dict[str, str] = {}

    def save_stats(i: int, tensors: dict[str, torch.Tensor]) -> None:
        key = stats_key(i, prefix)
        artifacts[key] = store.put_tensors(key, tensors)

    stream_layers(source, hidden, dtype, executor, "calibrate", save_stats=save_stats, budget_bytes=budget,
                  spill_dir=scratch, product_dtype=getattr(torch, cal.gram_product_dtype))
    return samples.numel(), artifacts


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
    """Factors of every compressed module, one call per (layer, input group), into `factor_store`
    (default: the stats store; separate stores let one calibration serve many methods and ratios).
    A group whose factors already exist and verify is not recomputed (keys are content-addressed).
    Returns the decompositions' diagnostics keyed by full module path, and the artifacts."""
    arch = source.architecture
    factor_store = factor_store or stats_store
    work = [(i, group) for i in range(source.num_layers) for group in arch.groups if layout.in_group(i, group)]

    def run(item) -> tuple[dict[str, float], str, str]:
        i, group = item
        prefix, key = arch.layer_prefix.format(i=i), factors_key(i, group.name, factors_prefix)
        if factor_store.verify(key):
            diagnostics = json.loads(factor_store.get_metadata(key).get("diagnostics", "{}"))
            sha = factor_store.checksum(key)
        else:
            modules = layout.in_group(i, group)
            weights = {m: source.tensor(f"{prefix}{m}.weight") for module in modules for m in module.members}
            stats = InputStats.from_tensors(stats_store.get_tensors(stats_key(i, stats_prefix)), group.name)
            result = decompose_group(spec.method, weights, stats, modules)
            tensors = {k: v.float() if v.is_floating_point() else v for k, v in result.tensors.items()}
            diagnostics = result.diagnostics
            sha = factor_store.put_tensors(key, tensors, metadata={"diagnostics": json.dumps(diagnostics)})
        return {prefix + name: value for name, value in diagnostics.items()}, key, sha

    diagnostics: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    for part, key, sha in executor.map(run, work, "decompose"):
        diagnostics.update(part)
        artifacts[key] = sha
    return diagnostics, artifacts


def assemble(spec: JobSpec, source: ModelSource, layout: ModelLayout, store: ArtifactStore, executor: LocalExecutor,
             folder: Path, factors_prefix: str = "factors", digest: str | None = None) -> None:
    """Write the compressed checkpoint: a shard per layer, globals, tokenizer, config; index last."""
    arch, dtype = source.architecture, getattr(torch, spec.model.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)  # whatever was here is not a finished checkpoint now

    def layer_shard(i: int) -> ShardInfo:
        fragment: dict[str, torch.Tensor] = {}
        for group in arch.groups:
            if layout.in_group(i, group):
                fragment.update(store.get_tensors(factors_key(i, group.name, factors_prefix)))
        state = assemble_layer_state(source.layer_state(i), fragment, layout.by_layer[i], dtype)
        prefix = arch.layer_prefix.format(i=i)
        return write_shard(folder, f"layers-{i:05d}.safetensors", {prefix + k: v for k, v in state.items()})

    shards = executor.map(layer_shard, list(range(source.num_layers)), "assemble")
    shards.append(write_shard(folder, "globals.safetensors", _global_tensors(source, dtype)))
    source.tokenizer().save_pretrained(folder)
    meta = {"method": spec.method.model_dump(mode="json"), "target": spec.target.model_dump(mode="json"),
            "ratio_definition": RATIO_DEFINITION, "dtype": spec.model.dtype, "layout": layout.flat(arch),
            "ranks": layout.ranks(arch), "source": spec.model.source, "digest": digest}
    write_index(folder, shards, _plain_config(source.config, spec.model.dtype), meta)


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


def perplexity(source: ModelSource, windows: torch.Tensor, dtype: torch.dtype, batch_size: int,
               executor: LocalExecutor, stage: str, layout: ModelLayout | None, scratch: Path) -> float:
    """Streamed perplexity over non-overlapping windows (one layer resident at a time)."""
    arch = source.architecture
    hidden = _embedded(source, windows, batch_size, dtype, 2 << 30, scratch)
    hidden = stream_layers(source, hidden, dtype, executor, stage, layout=layout, spill_dir=scratch)
    norm = arch.build_final_norm(source.config)
    norm.weight.data = source.final_norm().to(dtype)
    head = source.lm_head().to(dtype)
    total, count = 0.0, 0
    for chunk, ids in zip(hidden, windows.split(batch_size)):
        chunk_total, chunk_count = window_nll(chunk, norm, head, ids)
        total, count = total + chunk_total, count + chunk_count
    hidden.release()
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))
