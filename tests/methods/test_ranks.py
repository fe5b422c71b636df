from __future__ import annotations

import pytest

import rankfold.methods  # noqa: F401  (registers the methods)
from rankfold.evaluation.report import parameter_counts
from rankfold.methods.registry import METHODS
from rankfold.methods.structure import plan_layer as _plan_layer


def plan_layer(method, *args, **kwargs):
    return _plan_layer(METHODS.get(method).structure, *args, **kwargs)
from rankfold.methods.structure import rank_for_ratio
from rankfold.modules.layout import lowrank_params

SMOLLM2_LAYER = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                 "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.6, 0.9])
@pytest.mark.parametrize("m, n", list(SMOLLM2_LAYER.values()) + [(4096, 11008), (7, 3)])
def test_rank_is_the_largest_that_fits_the_budget(m, n, ratio):
    rank = rank_for_ratio(m, n, ratio)
    budget = (1 - ratio) * m * n
    assert lowrank_params(rank, m, n, False) <= budget or rank == 1
    assert lowrank_params(rank + 1, m, n, False) > budget


@pytest.mark.parametrize("method", ["svd_llm", "skipcat"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_model_ranks_meet_the_target_ratio_as_defined(ratio, method):
    shapes = {i: SMOLLM2_LAYER for i in range(30)}
    groups = [("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",))]
    layout = {i: plan_layer(method, groups, layer, ratio) for i, layer in shapes.items()}
    counts = parameter_counts(shapes, layout, model_total=10**9)
    # At least the target, and short of it by no more than one rank step per matrix.
    slack = sum(m + n for layer in shapes.values() for (m, n) in layer.values()) / counts["counted_dense"]
    assert ratio <= counts["achieved_compression"] <= ratio + slack
    assert counts["model_dense"] - counts["model_compressed"] == counts["counted_dense"] - counts["counted_compressed"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2])
def test_ratio_outside_unit_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match="compression ratio"):
        rank_for_ratio(10, 10, ratio)
