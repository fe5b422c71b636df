from __future__ import annotations

import pytest

from rankfold.methods.allocation import plan_layer

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
        assert module.parameters(SHAPES) <= (1 - ratio) * dense


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
