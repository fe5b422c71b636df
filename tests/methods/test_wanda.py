"""Wanda: per-row pruning by |W|·‖x‖, stored sparse; a job whose checkpoint is the pruned matrices."""

from __future__ import annotations

import json

import pytest
import torch

import rankfold
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.methods.wanda import wanda_prune, wanda_scores
from rankfold.modules.sparse import LowRankSparseLinear
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


def test_wanda_keeps_each_rows_highest_scores_not_the_largest_weights():
    torch.manual_seed(0)
    weight = torch.randn(6, 10, dtype=torch.float64)
    norms = torch.rand(10, dtype=torch.float64) * 10
    norms[3] = 0.0  # a dead input channel: never kept, whatever its weights
    values, indices = wanda_prune(weight, norms, 4)
    assert indices.dtype == torch.int32 and bool((indices[1:] > indices[:-1]).all())
    kept = torch.zeros(60, dtype=torch.bool)
    kept[indices.long()] = True
    kept = kept.view(6, 10)
    scores = wanda_scores(weight, norms)
    assert kept.sum(1).tolist() == [4] * 6 and not kept[:, 3].any()
    for row in range(6):  # every kept score beats every dropped one, in its row
        assert scores[row][kept[row]].min() >= scores[row][~kept[row]].max()
    assert torch.equal(values, weight.reshape(-1)[indices.long()])
    assert not torch.equal(kept, weight.abs() >= weight.abs().topk(4, dim=1).values[:, -1:])  # not magnitude


def test_wanda_job_checkpoint_is_the_pruned_model_at_the_counted_ratio(tiny_model_dir, tmp_path):
    spec = tiny_spec_dict(tiny_model_dir, tmp_path / "out", method="wanda", ratio=0.5)
    spec["evaluation"]["dense"] = False
    report = run_job(parse_spec(spec))
    params = report["parameters"]
    # 50 % counting value + index: a quarter of each row's entries; the papers' count says 75 %
    assert params["sparse_entries"] == params["counted_dense"] // 4
    assert params["achieved_compression"] == pytest.approx(0.5, abs=0.01)
    assert params["compression_values_only"] == pytest.approx(0.75, abs=0.01)
    model = rankfold.load(tmp_path / "out" / "model")
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, LowRankSparseLinear) and down.rank == 0 and down.nnz == 64 * 160 // 4
    from safetensors.torch import load_file

    dense = load_file(tiny_model_dir / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    pruned = down.dense()
    kept = pruned != 0
    assert torch.equal(pruned[kept], dense.float()[kept])  # kept entries are the dense ones, unchanged
    assert kept.sum(1).tolist() == [160 // 4] * 64
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert {m["kind"] for m in config["rankfold"]["layout"]} == {"lowrank_sparse"}


def test_wanda_with_a_global_allocator_is_a_spec_error(tiny_model_dir, tmp_path):
    spec = tiny_spec_dict(tiny_model_dir, tmp_path / "out", method="wanda")
    spec["target"]["allocation"] = {"kind": "flra"}
    with pytest.raises(SpecError, match="allocation.kind 'flra' does not apply to method.name 'wanda'"):
        parse_spec(spec)
