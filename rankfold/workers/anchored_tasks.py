"""The anchored walk's factorisation of one (layer, input group): the mixed objective's factors at
each candidate plain-term weight, the one with the smallest held-out anchored error kept
(methods/anchored.py) — or, choosing on the layer's output, every candidate stored for the shards to
score and the best kept; and the output correction of a block's output projections."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rankfold.core.device import to_host
from rankfold.core.errors import DecompositionError
from rankfold.methods.anchored import (
    CorrectionStats,
    OutputStats,
    PairedStats,
    anchored_error,
    corrected_output,
    correction_error,
    mixed_problem,
    output_error,
    output_mixed_problem,
)
from rankfold.methods.group_decomposition import GroupResult, decompose_group
from rankfold.methods.registry import MethodOptions
from rankfold.modules.layout import CompressedModule
from rankfold.storage.store import StoreError, StoreRef, open_ref
from rankfold.workers.tasks import _modules_and_weights, on_device

HELDOUT = "heldout."  # prefix of the held-out rows' statistics
PAIRED = "output.paired"  # the output problem's own paired statistics (token-weighted: fitting.token_weights)


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
    # fitting.output_mix: OutputStats (output.*, heldout.output.*) of the group's one
    # projection, fitted to the dense layer output (output_mixed_problem); "": the mixed problem
    output_key: str = ""


@dataclass
class GroupProblem:
    """One group's statistics, fitted and held-out rows apart: the paired ones and, when the group's one
    projection is fitted to the dense residual (fitting.output_mix), its OutputStats."""

    fitted: PairedStats
    heldout: PairedStats
    output: tuple[OutputStats, OutputStats] | None = None  # (fitted, held-out)

    @classmethod
    def read(cls, item: AnchoredItem) -> "GroupProblem":
        """The item's statistics from the store (on the worker's device), the output problem's with an
        output_key — whose own paired statistics (PAIRED, token-weighted) replace the group's when present."""
        output = on_device(open_ref(item.stats).get_tensors(item.output_key)) if item.output_key else {}
        if f"{PAIRED}.count" in output:
            tensors, prefix = output, PAIRED
        else:
            tensors, prefix = on_device(open_ref(item.stats).get_tensors(item.stats_key)), item.group
        problem = cls(PairedStats.from_tensors(tensors, prefix), PairedStats.from_tensors(tensors, HELDOUT + prefix))
        if output:  # set by the walk only where the projection's output reaches the residual unchanged
            problem.output = (OutputStats.from_tensors(output, "output"), OutputStats.from_tensors(output, HELDOUT + "output"))
        return problem

    def fit(self, method: MethodOptions, weights: dict[str, torch.Tensor], modules: list[CompressedModule],
            mix: float, every: bool = False) -> tuple[GroupResult, list[torch.Tensor]]:
        """The method's tensors at plain-term weight `mix` on the fitted rows (`every`: and the held-out
        ones), and each module's W′ (stacked members, float64)."""
        stats = self.fitted + self.heldout if every else self.fitted
        if self.output is None:
            return fit_mixed(method, weights, stats, mix, modules)
        output = self.output[0] + self.output[1] if every else self.output[0]
        (path,) = weights
        target, hessian = output_mixed_problem(weights[path], stats, output, mix)
        approximations: list[torch.Tensor] = []
        return decompose_group(method, {path: target}, hessian, modules, approximations=approximations), approximations

    def heldout_errors(self, weights: dict[str, torch.Tensor], modules: list[CompressedModule],
                       approximations: list[torch.Tensor]) -> list[float]:
        """Each module's held-out error: ‖W X_h − W′ X̂_h‖², or with the output problem Σ‖e − W′ x̂‖² (the
        layer output's error) over the held-out rows."""
        if self.output is not None:
            return [output_error(approximations[0], self.heldout, self.output[1])]
        return [anchored_error(torch.cat([weights[m] for m in module.members]), approx, self.heldout)
                for module, approx in zip(modules, approximations, strict=True)]


def fit_mixed(method: MethodOptions, weights: dict[str, torch.Tensor], stats: PairedStats, mix: float,
              modules: list[CompressedModule]) -> tuple[GroupResult, list[torch.Tensor]]:
    """The method's tensors for the mixed objective at plain-term weight `mix`, and each module's W′
    (stacked members, float64)."""
    correction, hessian = mixed_problem(stats, mix)
    targets = weights if correction is None else {m: w.to(torch.float64) @ correction for m, w in weights.items()}
    approximations: list[torch.Tensor] = []
    result = decompose_group(method, targets, hessian, modules, approximations=approximations)
    return result, approximations


def accepted_fits(item: AnchoredItem, weights, modules, problem: GroupProblem, every: bool = False):
    """Each candidate weight's (w, GroupResult, approximations) the method accepts, in item order. A
    candidate the method refuses (SkipCat's skip block too ill-conditioned for a low-precision forward: the
    mixed target W R can give an A₁ the plain W does not) is left out; DecompositionError when it refuses
    every candidate."""
    accepted, last_error = [], None
    for mix in item.candidates:
        try:
            accepted.append((mix, *problem.fit(item.method, weights, modules, mix, every)))
        except DecompositionError as error:
            last_error = error
    if not accepted:
        raise DecompositionError(f"{item.layer_prefix}{item.group}: the method refuses the factors at every "
                                 f"fitting.mix weight tried {list(item.candidates)} (add 1.0, the plain fit, "
                                 f"to the candidates): {last_error}") from last_error
    return accepted


def choose(item: AnchoredItem, weights, modules, problem: GroupProblem
           ) -> tuple[GroupResult, float, dict[str, list[float]], list[float]]:
    """(the kept result, its weight, every accepted candidate's held-out error per module by str(weight),
    the weights the method refused): the weight with the smallest held-out error summed over the
    group's modules is kept (accepted_fits), then refitted on every sequence, held-out ones included (the
    held-out rows choose the weight, not the factors; kept as fitted if the method refuses the refit).
    One candidate: fitted on every sequence, no choice made."""
    if len(item.candidates) == 1:
        accepted = accepted_fits(item, weights, modules, problem, every=True)
        return accepted[0][1], accepted[0][0], {}, []
    accepted = accepted_fits(item, weights, modules, problem)
    refused = [mix for mix in item.candidates if mix not in {found[0] for found in accepted}]
    errors = {str(mix): problem.heldout_errors(weights, modules, approximations) for mix, _, approximations in accepted}
    mix, result, _ = min(accepted, key=lambda found: sum(errors[str(found[0])]))
    refitted = refit(item, weights, modules, problem, mix)
    return (result if refitted is None else refitted), mix, errors, refused


def refit(item: AnchoredItem, weights, modules, problem: GroupProblem, mix: float) -> GroupResult | None:
    """The group fitted at weight `mix` on the fitted and held-out sequences' statistics together; None
    (keep the fit without the held-out ones) when there are none or the method refuses the refit."""
    if not problem.heldout.count:
        return None
    try:
        return problem.fit(item.method, weights, modules, mix, every=True)[0]
    except DecompositionError:
        return None


def anchored_item(item: AnchoredItem) -> tuple[dict[str, dict[str, float]], str, str]:
    """Factors of one (layer, input group) into the store (kept when they exist and verify). Returns
    (diagnostics {quantity: {full module path: value}}, artifact key, sha256); the diagnostics add
    `anchored_weight` (the group's kept plain-term weight: 1 is plain, 0 anchored), `output_anchored` (1:
    the projection was fitted to the dense layer output, output_mixed_problem), `heldout_error@<w>`
    (each module's held-out ‖W X − W′ X̂‖², or layer-output error, at candidate w), `anchored_refused` (how many candidates the
    method refused, when any) and `heldout_error_ratio` (the group's held-out
    error at the kept weight over the plain method's, when both were tried)."""
    factor_store = open_ref(item.factors)
    sha, diagnostics = factor_store.checksum(item.factors_key), None
    if sha is not None:
        try:
            diagnostics = json.loads(factor_store.get_metadata(item.factors_key).get("diagnostics", "{}"))
        except StoreError:
            diagnostics = None
    if diagnostics is None:
        modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
        problem = GroupProblem.read(item)
        result, mix, errors, refused = choose(item, weights, modules, problem)
        diagnostics, paths = dict(result.diagnostics), _paths(item.modules)
        diagnostics["anchored_weight"] = {path: mix for path in paths}
        if problem.output is not None:  # fitted to the dense layer output (fitting.output_mix)
            diagnostics["output_anchored"] = {path: 1 for path in paths}
        if refused:
            diagnostics["anchored_refused"] = {path: len(refused) for path in paths}
        for tried, values in errors.items():  # the held-out ‖W X − W′ X̂‖² of every candidate
            diagnostics[f"heldout_error@{tried}"] = dict(zip(paths, values))
        if str(1.0) in errors:
            plain = sum(errors[str(1.0)])
            ratio = sum(errors[str(mix)]) / plain if plain > 0 else 1.0  # 0: a full-rank fit, exact either way
            diagnostics["heldout_error_ratio"] = {path: ratio for path in paths}
        sha = factor_store.put_tensors(item.factors_key, _stored(result), metadata={"diagnostics": json.dumps(diagnostics)})
    return ({quantity: {item.layer_prefix + path: value for path, value in values.items()}
             for quantity, values in diagnostics.items()}, item.factors_key, sha)


def _stored(result: GroupResult) -> dict[str, torch.Tensor]:
    return to_host({k: v.float() if v.is_floating_point() else v for k, v in result.tensors.items()})


def _paths(modules: tuple[dict, ...]) -> list[str]:
    """The group's modules as diagnostics name them (a shared projection by its shared path)."""
    return [m.shared_path or m.members[0] for m in map(CompressedModule.from_json, modules)]


def candidate_key(stats_key: str, mix: float) -> str:
    """Where a candidate weight's factors wait for the layer-output choice (beside the group's statistics)."""
    return f"{stats_key.removesuffix('.safetensors')}-w{mix}.safetensors"


def fit_candidates(item: AnchoredItem) -> list[float]:
    """The layer-output choice's first half (fitting.choose_on: layer): every accepted candidate's factors
    into the statistics' store at candidate_key, its diagnostics in the metadata. Returns the accepted
    weights; the shards then score each (AnchoredShard.heldout_output_error) and keep_candidate keeps one."""
    modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
    store = open_ref(item.stats)
    accepted = accepted_fits(item, weights, modules, GroupProblem.read(item))
    for mix, result, _ in accepted:
        store.put_tensors(candidate_key(item.stats_key, mix), _stored(result),
                          metadata={"diagnostics": json.dumps(result.diagnostics)})
    return [mix for mix, _, _ in accepted]


@dataclass(frozen=True)
class KeepItem:
    candidates: AnchoredItem
    errors: dict[float, float]  # each accepted weight's held-out layer-output error, summed over shards


def _refitted(item: AnchoredItem, mix: float, candidate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kept candidate's tensors refitted on every sequence, held-out ones included (refit)."""
    modules, weights = _modules_and_weights(item.source, item.layer_prefix, item.modules)
    refitted = refit(item, weights, modules, GroupProblem.read(item), mix)
    return candidate if refitted is None else _stored(refitted)


def keep_candidate(item: KeepItem) -> tuple[dict[str, dict[str, float]], str, str]:
    """The layer-output choice's second half: the candidate with the smallest held-out layer-output error,
    refitted on every sequence (refit), becomes the group's factor artifact and every candidate is deleted. Returns (diagnostics, key,
    sha256) as anchored_item, with `layer_error@<w>` for each candidate and `heldout_error_ratio` the
    kept one's layer-output error over the plain fit's (when tried)."""
    fit, errors = item.candidates, item.errors
    kept, stats_store, paths = min(errors, key=errors.get), open_ref(fit.stats), _paths(fit.modules)
    chosen = candidate_key(fit.stats_key, kept)
    diagnostics = json.loads(stats_store.get_metadata(chosen).get("diagnostics", "{}"))
    diagnostics["anchored_weight"] = {path: kept for path in paths}
    if fit.output_key:  # fitted to a dense residual (fitting.attention_output_mix)
        diagnostics["output_anchored"] = {path: 1 for path in paths}
    for mix, error in errors.items():
        diagnostics[f"layer_error@{mix}"] = {path: error for path in paths}
    if errors.get(1.0):
        diagnostics["heldout_error_ratio"] = {path: errors[kept] / errors[1.0] for path in paths}
    sha = open_ref(fit.factors).put_tensors(fit.factors_key, _refitted(fit, kept, stats_store.get_tensors(chosen)),
                                            metadata={"diagnostics": json.dumps(diagnostics)})
    for mix in errors:
        stats_store.delete(candidate_key(fit.stats_key, mix))
    return ({quantity: {fit.layer_prefix + path: value for path, value in values.items()}
             for quantity, values in diagnostics.items()}, fit.factors_key, sha)


CORRECTION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # blends of the least-squares B and the fitted one tried
CORRECTED = "output_correction"  # metadata key: the artifact's B already went through the correction


@dataclass(frozen=True)
class CorrectionItem:
    layer_prefix: str
    path: str              # the corrected projection, inside the layer
    stats: StoreRef
    stats_key: str         # CorrectionStats of the fitted (correction.*) and held-out (heldout.correction.*) rows
    factors: StoreRef
    factors_key: str       # the artifact holding the projection's B (<path>.B), rewritten in place


def correction_item(item: CorrectionItem) -> tuple[dict[str, dict[str, float]], str, str]:
    """The output correction of one output projection (o_proj, down_proj): the blend weight with the
    smallest held-out error is kept (1: B unchanged), the correction at that weight refitted on every
    sequence, and the factor artifact rewritten with it, marked corrected. Returns (diagnostics, key, sha256); `output_correction_weight` and
    `output_correction_ratio` (the held-out residual error ‖dense − compressed‖² where the projection's
    output lands, with the kept B over the uncorrected one's) join the artifact's diagnostics."""
    store = open_ref(item.factors)
    metadata = store.get_metadata(item.factors_key)
    diagnostics = json.loads(metadata.get("diagnostics", "{}"))
    if metadata.get(CORRECTED) != "1":
        tensors, stats = store.get_tensors(item.factors_key), open_ref(item.stats).get_tensors(item.stats_key)
        if int(stats["correction.linear"][0]):
            b = tensors[f"{item.path}.B"]
            fitted = CorrectionStats.from_tensors(stats, "correction")
            heldout = CorrectionStats.from_tensors(stats, HELDOUT + "correction")
            candidates = {w: corrected_output(b, fitted, w) for w in CORRECTION_WEIGHTS}
            errors = {w: correction_error(candidate, heldout) for w, candidate in candidates.items()}
            kept = min(errors, key=errors.get)  # chosen on the held-out rows, then fitted on all (as refit)
            tensors[f"{item.path}.B"] = corrected_output(b, fitted + heldout, kept).to(b.dtype)
            diagnostics["output_correction_weight"] = {item.path: kept}
            diagnostics["output_correction_ratio"] = {item.path: errors[kept] / errors[1.0] if errors[1.0] > 0 else 1.0}
        store.put_tensors(item.factors_key, tensors, metadata={"diagnostics": json.dumps(diagnostics), CORRECTED: "1"})
    return ({quantity: {item.layer_prefix + path: value for path, value in values.items()}
             for quantity, values in diagnostics.items()}, item.factors_key, store.checksum(item.factors_key))
