"""How each stage kind runs: its driver-side work over the executor, the artifacts it writes and the
small result the manifest records. One function per kind, registered in STAGES with its VERSION
(bump it when a change could change a stage's output: the digests then change and nothing stale is reused).

Artifact keys: `<folder>/<digest>/layer-00000[-group].safetensors` (stats, fisher, spectra, factors)
and `checkpoints/<digest>/...` (the compressed checkpoint).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from rankfold.allocators.registry import ALLOCATORS, AllocationProblem
from rankfold.allocators.search import uses_fisher
from rankfold.checkpoint import RANK_GAINS
from rankfold.core.errors import NumericalError
from rankfold.core.registry import Registry
from rankfold.data.text import calibration_samples, load_text, tokenize
from rankfold.evaluation.registry import EVALUATORS, EvaluationContext
from rankfold.execution.base import Executor
from rankfold.execution.streaming import stream_fisher, stream_shards
from rankfold.jobs.spec import JobSpec
from rankfold.methods.registry import method_of
from rankfold.models.sources import ModelSource
from rankfold.orchestrator.checkpoints import assemble_checkpoint, checkpoint_is, place_checkpoint
from rankfold.orchestrator.layout import ModelLayout, Shapes, kv_layout, plan_layout
from rankfold.orchestrator.manifest import StageRecord
from rankfold.storage.store import ArtifactStore
from rankfold.storage.stored_model import stored_location
from rankfold.workers.shard import ShardConfig
from rankfold.orchestrator.kv import head_dim, search_kv_ranks
from rankfold.orchestrator.search import search_masks
from rankfold.workers.cap import SCORE_SUFFIX, RPCAItem, rpca_item
from rankfold.workers.kv import KVFactorsItem, kv_factors_item
from rankfold.workers.tasks import DecomposeItem, SpectrumItem, decompose_item, spectrum_item

if TYPE_CHECKING:
    from rankfold.orchestrator.plan import Plan, Stage

Artifacts = dict[str, str]  # key -> sha256
FISHER_DTYPE = "float32"    # squared gradients in bf16 would lose most of their digits
CHECKPOINTS = "checkpoints"  # store folder of compressed checkpoints


@dataclass
class JobContext:
    spec: JobSpec
    source: ModelSource
    store: ArtifactStore
    executor: Executor
    scratch: Path
    checkpoint: Path           # output.dir/model
    shapes: Shapes
    plan: "Plan"
    results: dict[str, dict] = field(default_factory=dict)  # stage name -> its recorded result

    @property
    def layout(self) -> ModelLayout:
        """The method's structure with the allocated ranks once `allocate` ran (uniform before), and
        the latent-KV attentions once `kv_allocate` ran."""
        ranks = self.results.get("allocate", {}).get("ranks")
        layout = plan_layout(self.spec, self.source.architecture, self.shapes,
                             None if ranks is None else {int(i): r for i, r in ranks.items()})
        kv_ranks = self.results.get("kv_allocate", {}).get("ranks")
        if kv_ranks is not None:
            layout.kv.update(kv_layout(self.spec, self.source.config, {int(i): r for i, r in kv_ranks.items()}))
        return layout

    def key(self, stage: str, layer: int, group: str | None = None) -> str:
        """Where `stage` keeps one layer's (and input group's) artifact: e.g. stats/<digest>/layer-00003.safetensors."""
        planned = self.plan[stage]
        return (f"{STAGES.get(planned.kind).folder}/{planned.digest}/layer-{layer:05d}" + (f"-{group}" if group else "")
                + ".safetensors")

    def items(self) -> list[tuple[int, str]]:
        """(layer, input group) pairs that hold compressed modules."""
        layout = self.layout
        return [(i, g.name) for i in range(self.source.num_layers) for g in self.source.architecture.groups
                if layout.in_group(i, g.name)]


@dataclass(frozen=True)
class PlanInputs:
    """What a stage's digest may draw on when the plan is made (see StageKind.inputs)."""

    spec: JobSpec
    model_id: str                # the source's content fingerprint
    sample: tuple                # the calibration sample's identity: (text sha256, num_samples, seq_len, seed)
    structure: list[dict]        # the method's compressed modules over every layer, ranks left out
    upstream: dict[str, str]     # digests of the stages planned so far


@dataclass(frozen=True)
class StageKind:
    kind: str
    run: Callable[[JobContext, "Stage"], tuple[dict, Artifacts]]
    version: str
    # reusable(ctx, stage, record): a verified record may still need its outputs placed (checkpoint)
    reusable: Callable[[JobContext, "Stage", StageRecord], bool] = lambda ctx, stage, record: True
    folder: str | None = None   # store folder of its per-layer artifacts
    # For stages an allocator asks for: what the stage's output depends on (hashed into its digest).
    inputs: Callable[[PlanInputs], tuple] | None = None
    # The allocator whose VERSION the digest carries, when several plan the stage and should share
    # its output (the Fisher pass: FLRA's, CAP's search and Palu's rank search); None: the planner's.
    shared_by: str | None = None


STAGES: Registry[StageKind] = Registry("stage kind")


def calibration_ids(spec: JobSpec, source: ModelSource) -> torch.Tensor:
    cal = spec.calibration
    return calibration_samples(tokenize(load_text(cal.data), source.tokenizer()), cal.num_samples, cal.seq_len,
                               cal.seed)


def calibrate(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Input statistics of every layer's groups (streamed over the shards), one artifact per layer."""
    cal, artifacts = ctx.spec.calibration, {}
    samples = calibration_ids(ctx.spec, ctx.source)

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        check_statistics(i, tensors, cal.gram_product_dtype)
        key = ctx.key(stage.name, i)
        artifacts[key] = ctx.store.put_tensors(key, tensors)

    config = ShardConfig(ctx.source.location, ctx.spec.model.dtype, cal.max_resident_mb << 20, str(ctx.scratch),
                         cal.gram_product_dtype)
    stream_shards(ctx.executor, config, samples, cal.batch_size, "calibrate", ctx.source.num_layers,
                  on_stats=save).release()
    return {"tokens": samples.numel()}, artifacts


def check_statistics(layer: int, tensors: dict[str, torch.Tensor], product_dtype: str) -> None:
    """Σ|x| and the Gram's diagonal bound every entry (|G_ij| ≤ √(G_ii G_jj)): cheap to check."""
    for name, value in tensors.items():
        if name.endswith((".abs_sum", ".gram")):
            checked = value.diagonal() if value.ndim == 2 else value
            if not bool(torch.isfinite(checked).all()):
                raise NumericalError(f"layer {layer}: calibration statistic {name} is not finite (products in "
                                     f"calibration.gram_product_dtype {product_dtype}); try float64 products or "
                                     "model.dtype bfloat16 / float32")


def fisher(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Fisher sums of every projection (streamed backward over the first `fisher_samples` sequences)."""
    (samples, batch_size), artifacts = fisher_settings(ctx.spec), {}
    ids = calibration_ids(ctx.spec, ctx.source)[:samples]

    def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
        key = ctx.key(stage.name, i)
        artifacts[key] = ctx.store.put_tensors(key, tensors)

    config = ShardConfig(ctx.source.location, FISHER_DTYPE, ctx.spec.calibration.max_resident_mb << 20,
                         str(ctx.scratch), FISHER_DTYPE)
    result = stream_fisher(ctx.executor, config, ids, batch_size, ctx.source.num_layers, save)
    return result, artifacts


def spectra(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Whitened spectra of every module of the structure, one task per (layer, input group)."""
    arch, layout, ref = ctx.source.architecture, ctx.layout, ctx.store.ref()
    items = [SpectrumItem(ctx.source.location, arch.layer_prefix.format(i=i), group,
                          tuple(m.to_json() for m in layout.in_group(i, group)), ref, ctx.key("calibrate", i),
                          ref, ctx.key(stage.name, i, group)) for i, group in ctx.items()]
    return {}, dict(ctx.executor.map(spectrum_item, items, "spectra"))


def allocate(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Ranks of every compressed matrix from the spec's allocator (on the driver; recorded in the manifest)."""
    allocation = ctx.spec.target.allocation
    # Cached: the allocator and its decode gains read the same Fisher sums and spectra.
    read = functools.cache(lambda stage, i, group: ctx.store.get_tensors(ctx.key(stage, i, group)))
    problem = AllocationProblem(method_of(ctx.spec.method), ctx.layout.by_layer, ctx.shapes, ctx.spec.target.ratio,
                                ctx.source.architecture.layer_prefix, read)
    allocator = ALLOCATORS.get(allocation.kind)
    ranks = allocator.allocate(allocation, problem)
    result, artifacts = {"ranks": {str(i): r for i, r in ranks.items()}}, {}
    if allocator.gains is not None:  # the decode order progressive decoding reads from the checkpoint
        key = f"{stage.prefix('gains')}/{RANK_GAINS}"
        artifacts[key] = ctx.store.put_tensors(key, allocator.gains(allocation, problem, ranks))
        result["gains"] = key
    return result, artifacts


def decompose(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Factors of every compressed module, one task per (layer, input group)."""
    arch, layout, ref = ctx.source.architecture, ctx.layout, ctx.store.ref()
    with_stats, reads = "calibrate" in ctx.plan, method_of(ctx.spec.method).reads
    items = [DecomposeItem(ctx.source.location, ctx.spec.method, arch.layer_prefix.format(i=i), group,
                           tuple(m.to_json() for m in layout.in_group(i, group)), ref,
                           ctx.key("calibrate", i) if with_stats else None, ref,
                           ctx.key(stage.name, i, group),
                           tuple((kind, m, ctx.key(kind, i, m)) for kind in reads
                                 for module in layout.in_group(i, group) for m in module.members))
             for i, group in ctx.items()]
    diagnostics: dict[str, dict[str, float]] = {}
    artifacts: Artifacts = {}
    for part, key, sha in ctx.executor.map(decompose_item, items, "decompose"):
        for quantity, values in part.items():
            diagnostics.setdefault(quantity, {}).update(values)
        artifacts[key] = sha
    return {"diagnostics": diagnostics}, artifacts


def assemble(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """The compressed checkpoint into the store (workers write its layer shards) and placed in output.dir."""
    layout, factor_keys = ctx.layout, {i: [] for i in range(ctx.source.num_layers)}
    for i, group in ctx.items():
        factor_keys[i].append(ctx.key("decompose", i, group))
    meta = {"method": ctx.spec.method.model_dump(mode="json"), "target": ctx.spec.target.model_dump(mode="json"),
            "source": ctx.spec.model.source, "digest": stage.digest}
    extras = {RANK_GAINS: ctx.results["allocate"]["gains"]} if "gains" in ctx.results.get("allocate", {}) else {}
    kv_keys = {i: ctx.key("kv_factors", i) for i in layout.kv}
    if ctx.spec.kv_cache is not None:
        meta["kv_cache"] = {**ctx.spec.kv_cache.model_dump(mode="json"), **ctx.results["kv_allocate"]["summary"]}
    artifacts = assemble_checkpoint(ctx.source, layout, ctx.spec.model.dtype, ctx.store, ctx.executor, factor_keys,
                                    stage.prefix(CHECKPOINTS), ctx.checkpoint, meta, extras, kv_keys)
    return {"folder": str(ctx.checkpoint)}, artifacts


def restore_checkpoint(ctx: JobContext, stage: "Stage", record: StageRecord) -> bool:
    """A finished assembly counts only if output.dir holds its verified checkpoint — placed again
    from the store when the folder is gone or damaged."""
    if checkpoint_is(ctx.checkpoint, stage.digest):
        return True
    shutil.rmtree(ctx.checkpoint, ignore_errors=True)
    place_checkpoint(ctx.store, record.artifacts, ctx.checkpoint)
    return checkpoint_is(ctx.checkpoint, stage.digest)


def evaluate(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """One evaluation entry on one variant (dense: the source; compressed: the written checkpoint)."""
    evaluator = EVALUATORS.get(stage.params["evaluator"])
    options = getattr(ctx.spec.evaluation, evaluator.name)[stage.params["entry"]]
    if stage.params["variant"] == "dense":
        location, layout = ctx.source.location, lambda i: None
    else:  # the artifact as written, not an in-memory copy; on a cluster from the store
        stored = stored_location(ctx.store.ref(), ctx.plan["assemble"].prefix(CHECKPOINTS))
        location, compressed = ctx.executor.model_location(str(ctx.checkpoint), stored), ctx.layout
        layout = compressed.layer_json
    context = EvaluationContext(ctx.executor, location, ctx.source.num_layers, layout, ctx.source.tokenizer(),
                                ctx.spec.model.dtype, ctx.scratch, stage.name)
    return {"rows": evaluator.evaluate(options, context)}, {}


def rpca(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """CAP: robust PCA units of every compressed matrix, one task per matrix (workers/cap.py)."""
    arch, ref = ctx.source.architecture, ctx.store.ref()
    items = [RPCAItem(ctx.source.location, ctx.spec.method, arch.layer_prefix.format(i=i), module.members[0],
                      module.group, ref, ctx.key("calibrate", i), ref, ctx.key(stage.name, i, module.members[0]),
                      ctx.key(stage.name, i, module.members[0] + SCORE_SUFFIX))
             for i, modules in ctx.layout.by_layer.items() for module in modules]
    artifacts: Artifacts = {}
    for pairs in ctx.executor.map(rpca_item, items, "rpca"):
        artifacts.update(pairs)
    return {}, artifacts


def search(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """CAP: which triples and sparse entries every matrix keeps, under the global budget."""
    return search_masks(ctx, stage, calibration_ids(ctx.spec, ctx.source))


def _rpca_inputs(plan: PlanInputs) -> tuple:
    """The matrices and robust PCA's settings — not the ratio (a sparse module's nnz), so one robust PCA
    serves every ratio and keep rule."""
    fields = {"iterations", "lam_scale", "rho", "triples", "whiten", "debias", "max_density"}
    matrices = [{k: v for k, v in module.items() if k != "options"} for module in plan.structure]
    return plan.model_id, plan.upstream["calibrate"], plan.spec.method.model_dump(mode="json", include=fields), \
        matrices


def _search_inputs(plan: PlanInputs) -> tuple:
    """The units (rpca), the Fisher pass it starts from (if it does), the budget and its convention, the
    search's settings and its calibration rows."""
    fisher = plan.upstream["fisher"] if uses_fisher(plan.spec.target.allocation) else None
    return (plan.upstream["rpca"], fisher, plan.spec.target.ratio, plan.spec.method.count_indices,
            plan.spec.model.dtype, plan.spec.target.allocation.model_dump(mode="json"), plan.sample)


def kv_factors(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Palu's full-rank G-LRD factors and spectra of every layer's k/v, one task per layer."""
    kv, arch, ref = ctx.spec.kv_cache, ctx.source.architecture, ctx.store.ref()
    items = [KVFactorsItem(ctx.source.location, arch.layer_prefix.format(i=i), head_dim(ctx.source.config),
                           kv.group_heads, ref, ctx.key("calibrate", i), ref, ctx.key(stage.name, i))
             for i in range(ctx.source.num_layers)]
    return {}, dict(ctx.executor.map(kv_factors_item, items, "kv_factors"))


def kv_allocate(ctx: JobContext, stage: "Stage") -> tuple[dict, Artifacts]:
    """Palu's ranks under the KV budget (on the driver; recorded in the manifest)."""
    read = lambda name, i: ctx.store.get_tensors(ctx.key(name, i))  # noqa: E731
    # Only the fisher search reads the Fisher sums (and only then are they in this stage's digest).
    fisher = read if ctx.spec.kv_cache.rank_search == "fisher" else None
    ranks, summary = search_kv_ranks(ctx.spec.kv_cache, ctx.source.config, read, fisher)
    return {"ranks": {str(i): r for i, r in ranks.items()}, "summary": summary}, {}


def fisher_settings(spec: JobSpec) -> tuple[int, int]:
    """(samples, batch size) of the Fisher pass: FLRA's when the weight allocation is Fisher's, else the
    KV rank search's — one pass serves both."""
    allocation = spec.target.allocation
    if hasattr(allocation, "fisher_samples"):
        return allocation.fisher_samples, allocation.fisher_batch_size
    return spec.kv_cache.fisher_samples, spec.kv_cache.fisher_batch_size


def _fisher_inputs(plan: PlanInputs) -> tuple:
    """Float32 whatever model.dtype; the first fisher_samples sequences of the calibration sample."""
    return plan.model_id, plan.sample, *fisher_settings(plan.spec)


for _kind in (StageKind("calibrate", calibrate, "1", folder="stats"),
              StageKind("fisher", fisher, "1", folder="fisher", inputs=_fisher_inputs, shared_by="fisher"),
              StageKind("spectra", spectra, "1", folder="spectra",
                        inputs=lambda plan: (plan.upstream["calibrate"], plan.structure)),
              StageKind("allocate", allocate, "1"), StageKind("decompose", decompose, "1", folder="factors"),
              StageKind("kv_factors", kv_factors, "1", folder="kv_factors"), StageKind("kv_allocate", kv_allocate, "2"),
              StageKind("rpca", rpca, "2", folder="rpca", inputs=_rpca_inputs),
              StageKind("search", search, "1", folder="search", inputs=_search_inputs),
              StageKind("assemble", assemble, "1", restore_checkpoint), StageKind("evaluate", evaluate, "1")):
    STAGES.register(_kind.kind, _kind)
