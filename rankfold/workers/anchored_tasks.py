"""The anchored walk's factorisation of one (layer, input group): the mixed objective's factors at
each candidate λ, the one with the smallest held-out anchored error kept (methods/anchored.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rankfold.methods.anchored import PairedStats, anchored_error, mixed_problem
from rankfold.methods.group_decomposition import GroupResult, decompose_group
from rankfold.methods.registry import MethodOptions
from rankfold.modules.layout import CompressedModule
from rankfold.storage.store import StoreError, StoreRef, open_ref
from rankfold.workers.anchored_shard import HELDOUT
from rankfold.workers.tasks import _modules_and_weights


@dataclass(frozen=True)
class AnchoredItem:
    source: str
    method: MethodOptions
    layer_prefix: str
    group: str
    modules: tuple[dict, ...]   # CompressedModule JSON, paths inside the layer
    stats: StoreRef
    stats_key: str              # PairedStats of the fitted rows (<group>.*) and held-out rows (heldout.<group>.*)
    factors: StoreRef
    factors_key: str
    candidates: tuple[float, ...]  # plain-term weights w tried (1: the plain method); one: no choice is made


def fit_mixed(method: MethodOptions, weights: dict[str, torch.Tensor], stats: PairedStats, mix: float,
              modules: list[CompressedModule]) -> tuple[GroupResult, list[torch.Tensor]]:
    """The method's tensors for the mixed objective at plain-term weight `mix`, and each module's W′
    (stacked members, float64)."""
    correction, hessian = mixed_problem(stats, mix)
    targets = weights if correction is None else {m: w.to(torch.float64) @ correction for m, w in weights.items()}
    approximations: list[torch.Tensor] = []
    result = decompose_group(method, targets, hessian, modules, approximations=approximations)
    return result, approximations


def heldout_error(weights: dict[str, torch.Tensor], modules: list[CompressedModule],
                  approximations: list[torch.Tensor], heldout: PairedStats) -> float:
    """Σ over modules of ‖W X_h − W′ X̂_h‖² on the held-out rows."""
    return sum(anchored_error(torch.cat([weights[m] for m in module.members]), approx, heldout)
               for module, approx in zip(modules, approximations, strict=True))


def choose(item: AnchoredItem, weights, modules, tensors) -> tuple[GroupResult, float, dict[str, float]]:
    """(the kept result, its weight, the held-out error of every candidate weight, by str(weight))."""
    fitted = PairedStats.from_tensors(tensors, item.group)
    heldout = PairedStats.from_tensors(tensors, HELDOUT + item.group)
    best, errors = None, {}
    for mix in item.candidates:
        result, approximations = fit_mixed(item.method, weights, fitted, mix, modules)
        if len(item.candidates) == 1:
            return result, mix, {}
        errors[str(mix)] = heldout_error(weights, modules, approximations, heldout)
        if best is None or errors[str(mix)] < best[2]:
            best = (result, mix, errors[str(mix)])
    return best[0], best[1], errors


def anchored_item(item: AnchoredItem) -> tuple[dict[str, dict[str, float]], str, str]:
    """Factors of one (layer, input group) into the store (kept when they exist and verify). Returns
    (diagnostics {quantity: {full module path: value}}, artifact key, sha256); the diagnostics add
    `anchored_weight` (the kept plain-term weight: 1 is plain, 0 anchored), `heldout_error@<w>` (each
    candidate's held-out ‖W X − W′ X̂‖², summed over the group's modules) and `heldout_error_ratio` (its held-out error over the
    plain method's, when both were tried)."""
    factor_store = open_ref(item.factors)
    sha, diagnostics = factor_store.checksum(item.factors_key), None
    if sha is not None:
        try:
            diagnostics = json.loads(factor_store.get_metadata(item.factors_key).get("diagnostics", "{}"))
        except StoreError:
            diagnostics = None
    if diagnostics is None:
        modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
        tensors = open_ref(item.stats).get_tensors(item.stats_key)
        result, mix, errors = choose(item, weights, modules, tensors)
        diagnostics = dict(result.diagnostics)
        paths = [module.shared_path or module.members[0] for module in modules]
        diagnostics["anchored_weight"] = {path: mix for path in paths}
        for tried, error in errors.items():  # the held-out ‖W X − W′ X̂‖² of every candidate
            diagnostics[f"heldout_error@{tried}"] = {path: error for path in paths}
        if str(1.0) in errors:
            ratio = errors[str(mix)] / max(errors[str(1.0)], 1e-300)
            diagnostics["heldout_error_ratio"] = {path: ratio for path in paths}
        stored = {k: v.float() if v.is_floating_point() else v for k, v in result.tensors.items()}
        sha = factor_store.put_tensors(item.factors_key, stored, metadata={"diagnostics": json.dumps(diagnostics)})
    return ({quantity: {item.layer_prefix + path: value for path, value in values.items()}
             for quantity, values in diagnostics.items()}, item.factors_key, sha)
