"""A job with a `kv_cache: palu` part: weights by the method, k/v by Palu; the checkpoint loads as a model
whose cache holds latents, and its perplexity row is what the loaded model computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DynamicCache

import rankfold
from rankfold.jobs.spec import SpecError, parse_any_spec, parse_spec
from rankfold.modules.latent_cache import LatentLayer
from rankfold.modules.latent_kv import LatentKVAttention
from rankfold.orchestrator.evaluation_run import run_evaluation
from rankfold.orchestrator.job import run_job
from rankfold.orchestrator.preflight import preflight
from tests.conftest import tiny_spec_dict

MATRICES = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def kv_spec(tiny_model_dir, tmp_path) -> dict:
    spec = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    spec["target"]["matrices"] = MATRICES
    spec["kv_cache"] = {"ratio": 0.5, "group_heads": 1, "rank_multiple": 4, "fisher_samples": 2}
    spec["evaluation"]["dense"] = False
    return spec


def test_palu_job_writes_a_latent_cache_checkpoint_within_budget(kv_spec, monkeypatch):
    calls = []
    forward = LatentKVAttention.forward
    monkeypatch.setattr(LatentKVAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    report = run_job(parse_spec(kv_spec))
    assert calls  # the perplexity evaluation ran through the latent attention
    config = json.loads((report_dir := parse_spec(kv_spec).output.dir / "model" / "config.json").read_text())
    kv = config["rankfold"]["kv_cache"]
    assert kv["kept_dims"] <= kv["budget_dims"] < kv["kept_dims"] + 4  # within one rank multiple
    assert kv["kept_dims"] % 4 == 0 and kv["budget_dims"] == 2 * 2 * 2 * 16 // 2
    assert kv["modelled_loss"] <= kv["modelled_loss_uniform"] + 1e-12
    model = rankfold.load(report_dir.parent)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, LatentKVAttention)
    assert attention.shape.fold_values is False  # o_proj is the weight method's (low rank): not folded
    ids = torch.randint(0, 1000, (1, 12))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    latent = cache.layers[0]
    assert isinstance(latent, LatentLayer)
    assert latent.keys.shape[-1] + latent.values.shape[-1] == sum(attention.shape.key_ranks + attention.shape.value_ranks)
    rows = {r["variant"]: r["value"] for r in report["rows"] if r["metric"] == "perplexity"}
    assert torch.isfinite(torch.tensor(rows["compressed"]))
    # `rankfold eval` of the checkpoint folder (layers built from its config) gives the job's value
    evaluation = parse_any_spec({"model": {"source": str(report_dir.parent)}, "output": {"dir": str(report_dir.parents[1] / "eval")},
                                 "evaluation": {"perplexity": kv_spec["evaluation"]["perplexity"]}})
    (row,) = run_evaluation(evaluation)["rows"]
    assert row["variant"] == "compressed" and row["value"] == pytest.approx(rows["compressed"], rel=1e-6)


def test_quantised_hadamard_cache_with_dense_o_proj_folds_values(kv_spec):
    kv_spec["target"]["matrices"] = ["gate_proj", "up_proj", "down_proj"]
    kv_spec["kv_cache"].update({"bits": 3, "quant_group": 8, "rank_multiple": 8, "hadamard": True,
                                "rank_search": "uniform"})
    run_job(parse_spec(kv_spec))
    model = rankfold.load(parse_spec(kv_spec).output.dir / "model")
    attention = model.model.layers[1].self_attn
    assert attention.shape.fold_values and attention.cache_config.bits == 3
    assert attention.o_proj.in_features == 2 * sum(attention.shape.value_ranks)  # 2 query heads per KV head
    out = model.generate(torch.randint(0, 1000, (2, 6)), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)


def test_skipcat_weights_with_a_latent_cache_load_and_generate(kv_spec):
    """Seed 002: a skip layout registers its projections on the attention the latent one replaces."""
    kv_spec["method"] = {"name": "skipcat"}
    kv_spec["kv_cache"].update({"group_heads": 2, "bits": 4, "quant_group": 8})
    report = run_job(parse_spec(kv_spec))
    model = rankfold.load(report["checkpoint"])
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, LatentKVAttention) and hasattr(attention, "q_proj_in")
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    (row,) = [r for r in report["rows"] if r["variant"] == "compressed"]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.isfinite(nll) and torch.isfinite(torch.tensor(row["value"]))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 12)


def test_kv_cache_spec_errors(kv_spec):
    bad = copy.deepcopy(kv_spec)
    bad["target"]["matrices"] = MATRICES + ["k_proj"]
    with pytest.raises(SpecError, match="leave k_proj out of target.matrices"):
        parse_spec(bad)
    bad = copy.deepcopy(kv_spec)
    bad["kv_cache"]["group_heads"] = 3
    with pytest.raises(SpecError, match=r"kv_cache.group_heads: .*allowed: 1, 2"):
        preflight(parse_spec(bad))
    bad = copy.deepcopy(kv_spec)
    bad["kv_cache"]["ratio"] = 0.95
    with pytest.raises(SpecError, match="kv_cache.ratio = 0.95"):
        preflight(parse_spec(bad))
    bad = copy.deepcopy(kv_spec)
    bad["kv_cache"].update({"bits": 3, "quant_group": 12})
    with pytest.raises(SpecError, match="quant_group"):
        parse_spec(bad)


def test_cache_only_job_keeps_every_weight_dense(kv_spec):
    kv_spec["target"]["matrices"] = []
    kv_spec["kv_cache"]["rank_search"] = "uniform"
    report = run_job(parse_spec(kv_spec))
    assert report["parameters"]["counted_dense"] == 0 and report["ranks"] == {}
    model = rankfold.load(parse_spec(kv_spec).output.dir / "model")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, LatentKVAttention) and isinstance(attention.q_proj, torch.nn.Linear)
    assert attention.shape.key_ranks == (8, 8)  # half of each 16-dim head
    empty = copy.deepcopy(kv_spec)
    del empty["kv_cache"]
    with pytest.raises(SpecError, match="target.matrices is empty"):
        parse_spec(empty)
