"""kv_allocate: Palu's rank search over a whole model, on the driver — the kv_factors stage's spectra
(and, for `rank_search: fisher`, the Fisher pass's head-group sums) of every layer -> the ranks of every
head group's keys and values, recorded in the manifest with a summary.

params: kv_cache (PaluOptions). inputs: kv_factors, fisher (optional: the allocator's pass when its
settings agree, else one of its own named kv_fisher)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rankfold.methods.palu import VERSION as PALU_VERSION
from rankfold.methods.palu import (
    PaluOptions,
    RankUnit,
    kv_budget,
    loss_weight,
    search_ranks,
    uniform_ranks,
)
from rankfold.methods.palu_cache import PROJECTIONS
from rankfold.models.architecture import architecture_for
from rankfold.modules.latent_kv import head_dim
from rankfold.orchestrator.stages.fisher import fisher_params
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import FisherSums, KVFactors, KVRanks
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.fisher_backward import head_group_scores
from rankfold.workers.kv import GRAM_TRACE

Read = Callable[[int], dict[str, torch.Tensor]]  # layer -> the layer's artifact


def kv_allocate(env: Env, stage: Stage, *, kv_factors: KVFactors, fisher: FisherSums | None = None,
                ) -> tuple[dict, Artifacts]:
    """Palu's ranks under the KV budget; Fisher sums are wired (and read) only for the fisher search."""
    ranks, summary = search_kv_ranks(stage.params["kv_cache"], env.source.config, kv_factors.read,
                                     fisher.read if fisher is not None else None)
    return {"ranks": {str(i): r for i, r in ranks.items()}, "summary": summary}, {}


def kv_units(options: PaluOptions, config, read: Read, fisher: Read | None) -> list[RankUnit]:
    """One RankUnit per (layer, k|v, group); weight 1 without Fisher sums (plain whitened energy)."""
    d, g, arch = head_dim(config), options.group_heads, architecture_for(config)
    units = []
    for i in range(config.num_hidden_layers):
        factors = read(i)
        trace = float(factors[GRAM_TRACE][0])
        sums = fisher(i) if fisher is not None else None
        for kind, path in PROJECTIONS.items():
            scores = head_group_scores(sums, *arch.part_rows(path), d, g) if sums is not None else None
            for k in range(config.num_key_value_heads // g):
                weight = loss_weight(float(scores[k]), d * g, trace) if scores is not None else 1.0
                units.append(RankUnit((i, kind, k), factors[f"{kind}.{k}.energy"], weight))
    return units


def search_kv_ranks(options: PaluOptions, config, read: Read,
                    fisher: Read | None) -> tuple[dict[int, dict[str, list[int]]], dict]:
    """Ranks {layer: {"k": [per group], "v": [...]}} and a summary (budget, kept fraction, bytes per token,
    the modelled loss Σ w·σ² dropped by this allocation and by the uniform one)."""
    units = kv_units(options, config, read, fisher)
    full = sum(u.full for u in units)
    budget = kv_budget(full, options.ratio)
    uniform = uniform_ranks(units, budget, options.rank_multiple)
    chosen = uniform if options.rank_search == "uniform" else search_ranks(units, budget, options.rank_multiple)
    ranks: dict[int, dict[str, list[int]]] = {}
    for (i, kind, _), rank in sorted(chosen.items()):
        ranks.setdefault(i, {"k": [], "v": []})[kind].append(rank)
    def dropped(r: dict) -> float:
        return sum(u.weight * float(u.energy[r[u.key]:].sum()) for u in units)

    kept = sum(chosen.values())
    summary = {"budget_dims": budget, "kept_dims": kept, "full_dims": full, "kept_fraction": kept / full,
               "modelled_loss": dropped(chosen), "modelled_loss_uniform": dropped(uniform),
               "latent_bytes_per_token": latent_bytes(ranks, options),
               "dense_kv_numbers_per_token": 2 * config.num_key_value_heads * head_dim(config) * config.num_hidden_layers}
    return ranks, summary


def latent_bytes(ranks: dict[int, dict[str, list[int]]], options: PaluOptions, dtype_bytes: int = 2) -> float:
    """Bytes per token of the cached latents: per layer and k|v, b/8 per number (rounded up to whole
    quantisation groups) plus a float16 minimum and step per group when quantised, else `dtype_bytes` each."""
    widths = [sum(layer[kind]) for layer in ranks.values() for kind in ("k", "v")]
    if options.bits == 16:
        return float(sum(widths) * dtype_bytes)
    groups = sum(-(-w // options.quant_group) for w in widths)
    return groups * (options.quant_group * options.bits / 8 + 4)


def plan(context: PlanContext) -> tuple[dict, dict]:
    """The search reads a Fisher pass for `rank_search: fisher`: the allocator's when the settings agree
    (one pass), else its own `kv_fisher`, added here."""
    kv, builder, fisher = context.spec.kv_cache, context.builder, None
    if kv.rank_search == "fisher":
        params = fisher_params(context.model, context.sample, kv.fisher_samples, kv.fisher_batch_size)
        fisher = "kv_fisher" if "fisher" in builder and builder["fisher"].params != params else "fisher"
        if fisher not in builder:
            builder.add(fisher, "fisher", params)
    return {"kv_cache": kv}, {"kv_factors": "kv_factors", "fisher": fisher}


register_stage(StageKind("kv_allocate", kv_allocate, "3", KVRanks, producer=lambda params: PALU_VERSION,
                         plan=plan))
