"""anchored: calibration and decomposition interleaved, one walk over the layers (methods/anchored.py).

Shards carry the dense and the compressed-so-far activations of the calibration sequences. For each
layer, input group by input group in forward order (attention's input, o's, the MLP's, down's), the
shards return the paired statistics of that group's input — the compressed stream running the layer
with the groups before it already factorised (a group fitted by the plain method alone, w = 1, needs the
dense stream's only) — reduced over shards in shard order; one of the shards
fits the group's factors (the shards hold the workers: a separate task would wait for one); with
`fitting.output_correction` the layer's last projection's (down_proj) B is refitted to the dense layer's
output, with `fitting.attention_correction` o_proj's, once its group is fitted, to the dense residual
after attention (anchored_tasks.correction_item); with `fitting.output_mix` the layer's last projection
(and with `fitting.attention_output_mix` o_proj) is fitted toward a dense residual; with `fitting.refine` a few Adam steps on the layer's
factors toward the dense layer output (anchored_refine.py); then both streams advance through the layer. Factors already in the
store (a resumed walk) are kept: the walk only re-runs the forward passes up to where it stopped.

params: model {id, dtype}, method, calibration (CalibrationSpec), sample, fitting (FittingSpec).
inputs: ranks (the allocated layout). Output: Factors, as decompose's (assemble reads either)."""

from __future__ import annotations

from rankfold.execution.streaming import ShardGroup, per_shard_config, split_rows
from rankfold.methods.registry import method_of
from rankfold.models.architecture import ATTENTION_OUTPUT
from rankfold.orchestrator.stages.anchored_refine import refine_layer
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Factors, Ranks
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.anchored_shard import AnchoredShard
from rankfold.workers.anchored_tasks import CORRECTED, AnchoredItem, CorrectionItem, KeepItem, candidate_key
from rankfold.workers.reduce import ReduceItem, reduce_statistics
from rankfold.workers.shard import ShardConfig

STATS_FOLDER = "anchored_stats"  # a group's paired statistics, deleted once its factors are stored


def anchored(env: Env, stage: Stage, *, ranks: Ranks) -> tuple[dict, Artifacts]:
    """The result holds the diagnostics ({quantity: {module path: value}}), among them each module's
    kept plain-term weight (`anchored_weight`)."""
    params, source = stage.params, env.source
    arch, layout = source.architecture, ranks.layout  # a mixture is refused before (preflight)
    cal, fitting = params["calibration"], params["fitting"]
    samples = params["sample"].ids(source.tokenizer())
    parts = split_rows(samples, env.executor.workers)
    heldout = [_heldout_rows(parts, k, fitting.heldout) for k in range(len(parts))]
    config = ShardConfig(source.location, params["model"]["dtype"], env.max_resident_mb << 20, str(env.scratch),
                         cal.gram_product_dtype)
    shards = ShardGroup(env.executor, "anchored", per_shard_config(config, env.executor, len(parts)), len(parts),
                        shard_class=AnchoredShard)
    diagnostics: dict[str, dict[str, float]] = {}
    artifacts: Artifacts = {}
    try:
        relative = fitting.token_weights == "relative"
        shards.call_each("load", [(part, cal.batch_size, rows, relative) for part, rows in zip(parts, heldout)])
        for i in env.executor.steps(range(source.num_layers), "anchored"):
            done: list[tuple[str, str]] = []  # (group, factors key) of this layer so far
            groups = _groups_in_order(arch, layout, i)
            for group in groups:
                target, point = _output_target(fitting, arch, group, groups)
                key = _merge(diagnostics, artifacts, _fit_group(env, stage, shards, i, group, layout, done, target,
                                                                point))
                done.append((group, key))
                if fitting.attention_correction and group == ATTENTION_OUTPUT and arch.attention_residual:
                    _merge(diagnostics, artifacts, _correct_output(env, stage, shards, i, layout, done,
                                                                   arch.attention_residual))
            if fitting.output_correction and done:
                _merge(diagnostics, artifacts, _correct_output(env, stage, shards, i, layout, done, None))
            if fitting.refine is not None and done:
                _refine(env, stage, shards, i, layout, done, diagnostics, artifacts)
            shards.call("advance_pair", i, _layout_of(layout, i, done), env.store.ref(), [k for _, k in done],
                        i < source.num_layers - 1)
    finally:
        shards.release()
    return {"diagnostics": diagnostics, "tokens": samples.numel()}, artifacts


def _refine(env: Env, stage: Stage, shards: ShardGroup, i: int, layout, done: list[tuple[str, str]],
            diagnostics: dict, artifacts: Artifacts) -> None:
    """fitting.refine on layer i's fitted groups (anchored_refine.refine_layer); their artifacts rewritten."""
    pending = f"{stage.prefix(STATS_FOLDER)}/layer-{i:05d}-refined.safetensors"
    found, shas = refine_layer(shards, env.store, i, env.source.architecture.layer_prefix.format(i=i),
                               _layout_of(layout, i, done), [k for _, k in done], pending, stage.params["fitting"].refine)
    for quantity, values in found.items():
        diagnostics.setdefault(quantity, {}).update(values)
    artifacts.update(shas)


def _merge(diagnostics: dict, artifacts: Artifacts, found: tuple[dict, str, str]) -> str:
    """Add one task's (diagnostics, key, sha256) to the stage's; returns the key."""
    values_by_quantity, key, sha = found
    for quantity, values in values_by_quantity.items():
        diagnostics.setdefault(quantity, {}).update(values)
    artifacts[key] = sha
    return key


def _heldout_rows(parts, k: int, heldout: int) -> int:
    """Rows of shard k among the sample's last `heldout` (contiguous shards in sample order)."""
    total = sum(part.shape[0] for part in parts)
    start = sum(part.shape[0] for part in parts[:k])
    return max(0, min(start + parts[k].shape[0], total) - max(start, total - heldout))


def _groups_in_order(arch, layout, i: int) -> list[str]:
    """Layer i's compressed input groups in the order the forward reaches them (the family's list)."""
    present = {module.group for module in layout.by_layer.get(i, [])}
    return [group.name for group in arch.groups if group.name in present]


def _layout_of(layout, i: int, done: list[tuple[str, str]]) -> list[dict]:
    groups = {group for group, _ in done}
    return [module.to_json() for module in layout.by_layer.get(i, []) if module.group in groups]


def _output_target(fitting, arch, group: str, groups: list[str]) -> tuple[bool, str | None]:
    """(whether `group` is fitted toward a dense residual — fitting.output_mix —, the residual's point:
    None the layer output, for the layer's last group; the residual after attention for o_proj's, with
    fitting.attention_output_mix)."""
    if fitting.output_mix is None:
        return False, None
    if group == groups[-1]:
        return True, None
    if fitting.attention_output_mix and group == ATTENTION_OUTPUT and arch.attention_residual:
        return True, arch.attention_residual
    return False, None


def _fit_group(env: Env, stage: Stage, shards: ShardGroup, i: int, group: str, layout,
               done: list[tuple[str, str]], toward_residual: bool = False, point: str | None = None) -> tuple[dict, str, str]:
    """One group's factors (kept if stored and verified): its paired statistics from the shards into
    the store, fitted by one task (the weight chosen on the layer's output: _choose_on_layer), then the
    statistics deleted. `toward_residual` (fitting.output_mix; _output_target): the group, when it is one projection
    whose output the layer adds to its residual at `point` unchanged, is fitted to the dense residual
    there (its OutputStats gathered too) — toward the layer output (point None) its weight chosen on that
    output's held-out error by the fit, toward an inner point on the layer output's (_choose_on_layer);
    otherwise it is fitted as the others."""
    arch, ref, fitting = env.source.architecture, env.store.ref(), stage.params["fitting"]
    key = Factors.key_of(stage, i, group)
    modules = layout.in_group(i, group)
    stats_key = f"{stage.prefix(STATS_FOLDER)}/layer-{i:05d}-{group}.safetensors"
    stored, reader, keys = env.store.verify(key), modules[0].members[0], [k for _, k in done]
    output = (toward_residual and not stored and len(modules) == 1 and len(modules[0].members) == 1
              and shards.run_on(i % len(shards.shards), "output_is_linear", i, reader, _layout_of(layout, i, done),
                                ref, keys, point))
    output_key = f"{stage.prefix(STATS_FOLDER)}/layer-{i:05d}-{group}-output.safetensors" if output else ""
    item = AnchoredItem(env.source.location, stage.params["method"], arch.layer_prefix.format(i=i), group,
                        tuple(m.to_json() for m in modules), ref, stats_key, ref, key,
                        fitting.output_mix if output else fitting.mix, output_key)
    # the output statistics carry the problem's own paired sums; the plain fit (w = 1 alone) reads X's only
    if not stored and not output:
        shards.call_reduced("paired_stats", i, group, reader, _layout_of(layout, i, done), ref, keys,
                            item.candidates == (1.0,), reduce=reduce_statistics, item=ReduceItem(ref, stats_key, i),
                            record=False)
    if not stored and output:
        shards.call_reduced("output_stats", i, reader, _layout_of(layout, i, done), ref, keys, point,
                            reduce=reduce_statistics, item=ReduceItem(ref, output_key, i), record=False)
    on_layer = point is not None if output else fitting.choose_on == "layer"
    if not stored and on_layer and len(item.candidates) > 1:
        diagnostics, key, sha = _choose_on_layer(shards, i, group, layout, done, item)
    else:  # fits (output: its choice is on the layer output already), or reads the stored factors' diagnostics
        diagnostics, key, sha = shards.run_on(i % len(shards.shards), "fit", item)
    for written in (stats_key, output_key):
        if written and env.store.exists(written):
            env.store.delete(written)
    return diagnostics, key, sha


def _choose_on_layer(shards: ShardGroup, i: int, group: str, layout, done: list[tuple[str, str]],
                     item: AnchoredItem) -> tuple[dict, str, str]:
    """fitting.choose_on: layer — one shard fits every candidate weight, every shard scores each on its
    held-out rows of the layer's output (one float per shard and candidate comes back), one shard keeps
    the best. Returns (diagnostics, factors key, sha256)."""
    k = i % len(shards.shards)
    errors = {}
    for mix in shards.run_on(k, "fit_candidates", item):
        keys = [key for _, key in done] + [candidate_key(item.stats_key, mix)]
        errors[mix] = sum(shards.call("heldout_output_error", i, _layout_of(layout, i, [*done, (group, "")]),
                                      item.stats, keys, record=False))
    return shards.run_on(k, "keep", KeepItem(item, errors))


def _correct_output(env: Env, stage: Stage, shards: ShardGroup, i: int, layout, done: list[tuple[str, str]],
                    point: str | None) -> tuple[dict, str, str]:
    """The last group fitted in layer i, when it is one projection (o_proj, down_proj), gets the output
    correction toward the dense residual at `point` (None: the layer's output), once: an artifact already
    corrected (a resumed walk, or o_proj the layer's last group) is kept. Returns (diagnostics, its factors
    key, sha256)."""
    group, key = done[-1]
    modules, ref = layout.in_group(i, group), env.store.ref()
    if len(modules) != 1 or len(modules[0].members) != 1:
        return {}, key, env.store.checksum(key)
    path = modules[0].members[0]
    stats_key = f"{stage.prefix(STATS_FOLDER)}/layer-{i:05d}-{group}-correction.safetensors"
    if env.store.get_metadata(key).get(CORRECTED) != "1":
        shards.call_reduced("correction_stats", i, path, _layout_of(layout, i, done), ref, [k for _, k in done],
                            point, reduce=reduce_statistics, item=ReduceItem(ref, stats_key, i), record=False)
    item = CorrectionItem(env.source.architecture.layer_prefix.format(i=i), path, ref, stats_key, ref, key)
    diagnostics, key, sha = shards.run_on(i % len(shards.shards), "correct", item)
    if env.store.exists(stats_key):
        env.store.delete(stats_key)
    return diagnostics, key, sha


register_stage(StageKind("anchored", anchored, "3", Factors, producer=lambda params: method_of(params["method"]).version))
