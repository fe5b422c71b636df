from __future__ import annotations

import pytest

import rankfold.methods  # noqa: F401  (registers the methods)
from rankfold.methods.registry import METHODS
from rankfold.methods.structure import module_params
from rankfold.methods.structure import plan_layer as _plan_layer


def plan_layer(method, *args, **kwargs):
    return _plan_layer(METHODS.get(method).structure, *args, **kwargs)

GROUPS = [("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("attn_out", ("self_attn.o_proj",)),
          ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")), ("mlp_out", ("mlp.down_proj",))]
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "cat", "skip", "skipcat"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_every_module_fits_its_share_of_the_budget(method, ratio):
    layout = plan_layer(method, GROUPS, SHAPES, ratio)
    assert sorted(m for module in layout for m in module.members) == sorted(SHAPES)
    for module in layout:
        dense = sum(SHAPES[m][0] * SHAPES[m][1] for m in module.members)
        assert module_params(module, SHAPES) <= (1 - ratio) * dense


def test_skipcat_keeps_the_most_rank_per_group():
    ranks = {method: {m: module.rank for module in plan_layer(method, GROUPS, SHAPES, 0.2) for m in module.members}
             for method in ("svd_llm", "cat", "skip", "skipcat")}
    for matrix in SHAPES:
        assert ranks["skipcat"][matrix] >= max(ranks["cat"][matrix], ranks["skip"][matrix]) >= ranks["svd_llm"][matrix]
    assert ranks["skipcat"]["self_attn.q_proj"] > 1.5 * ranks["svd_llm"]["self_attn.q_proj"]


def test_partial_group_shares_only_compressed_members():
    shapes = {k: v for k, v in SHAPES.items() if k != "self_attn.v_proj"}
    layout = plan_layer("skipcat", GROUPS, shapes, 0.2)
    attn = [module for module in layout if "self_attn.q_proj" in module.members][0]
    assert attn.members == ("self_attn.q_proj", "self_attn.k_proj")


def test_given_ranks_replace_the_uniform_rule():
    ranks = {"self_attn.q_proj": 100, "self_attn.k_proj": 40, "self_attn.v_proj": 64, "self_attn.o_proj": 300,
             "mlp.gate_proj": 200, "mlp.up_proj": 250, "mlp.down_proj": 7}
    layout = plan_layer("svd_llm", GROUPS, SHAPES, 0.2, ranks=ranks)
    assert {module.members[0]: module.rank for module in layout} == ranks
    assert all(module.kind == "lowrank" for module in layout)


def test_given_ranks_for_shared_projections_must_agree():
    ranks = {m: 120 for m in SHAPES}
    layout = plan_layer("skipcat", GROUPS, SHAPES, 0.2, ranks=ranks)
    assert {module.rank for module in layout} == {120} and len(layout) == 4
    ranks["self_attn.k_proj"] = 121
    with pytest.raises(ValueError, match="need one rank"):
        plan_layer("skipcat", GROUPS, SHAPES, 0.2, ranks=ranks)


@pytest.mark.parametrize("ranks, message", [
    ({m: 10 for m in SHAPES if m != "mlp.up_proj"}, "no rank given for mlp.up_proj"),
    ({**{m: 10 for m in SHAPES}, "self_attn.k_proj": 193}, r"k_proj = 193: must be an integer in \[1, 192\]"),
    ({**{m: 10 for m in SHAPES}, "mlp.down_proj": 0}, "must be an integer"),
    ({**{m: 10 for m in SHAPES}, "mlp.down_proj": 2.5}, "must be an integer"),
    ({**{m: 10 for m in SHAPES}, "lm_head": 10}, "not compressed here: lm_head"),
])
def test_bad_given_ranks_name_the_matrix(ranks, message):
    with pytest.raises(ValueError, match=message):
        plan_layer("svd_llm", GROUPS, SHAPES, 0.2, ranks=ranks)
