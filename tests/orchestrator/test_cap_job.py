"""A CAP job (robust PCA + global search) on the tiny model: budget, checkpoint round trip, the
ranks-only case, resuming an interrupted search, and a budget the units cannot meet."""

from __future__ import annotations

import json

import pytest
import torch

import rankfold
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.methods.cap import masked_weight
from rankfold.modules.sparse import LowRankSparseLinear
from rankfold.orchestrator.job import run_job
from rankfold.orchestrator.stages import search as search_stage
from rankfold.storage.store import LocalStore
from tests.conftest import CALIBRATION_TEXT, tiny_spec_dict


def _spec(model_dir, out, **allocation) -> dict:
    spec = tiny_spec_dict(model_dir, out, method="cap", ratio=0.5)
    spec["target"]["allocation"] = {"kind": "search", "samples": 4, "holdout": 4, "batch_size": 4, "steps": 4,
                                    "save_every": 2, "sparse_block": 8, "fisher_samples": 4, **allocation}
    spec["evaluation"]["dense"] = False
    return spec


def _search_result(out) -> dict:
    """The search stage's recorded result (stage records in the job's local store)."""
    records = [json.loads(p.read_text()) for p in (out / "artifacts" / "stages").glob("*.json")]
    return next(r["result"] for r in records if "rule" in r.get("result", {}))


def test_cap_job_meets_its_budget_and_its_checkpoint_is_the_searched_masks(tiny_model_dir, tmp_path):
    report = run_job(parse_spec(_spec(tiny_model_dir, tmp_path / "out")))
    params = report["parameters"]
    budget = 0.5 * params["counted_dense"]
    largest_unit = 64 + 160  # a gate/up/down triple
    assert params["counted_compressed"] <= budget < params["counted_compressed"] + largest_unit
    model = rankfold.load(tmp_path / "out" / "model")
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    layout = {m["members"][0]: m for m in config["rankfold"]["layout"]}
    store = LocalStore(tmp_path / "out" / "artifacts")
    # the loaded layer computes with W̃ = U diag(σ⊙m_σ) Vᵀ + S⊙m_S, the masks the search stored
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LowRankSparseLinear)
    units = next(k for k in store.list_keys("rpca/") if k.endswith("layer-00000-mlp.up_proj.safetensors"))
    masks = next(k for k in store.list_keys("search/") if k.endswith("layer-00000-mlp.up_proj.safetensors"))
    keep = store.get_tensors(masks)
    expected = masked_weight(store.get_tensors(units), keep["keep_triples"], keep["keep_sparse"], (160, 64),
                             torch.float32)
    assert up.rank == int(keep["keep_triples"].sum()) and up.nnz == layout["model.layers.0.mlp.up_proj"]["options"]["nnz"]
    assert torch.allclose(up.dense(), expected, atol=1e-5)
    x = torch.randn(3, 64)
    assert torch.allclose(up(x), x @ expected.T, atol=1e-4)


def test_without_sparse_candidates_cap_selects_ranks_of_the_low_rank_part(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, tmp_path / "out", rule="uniform")
    spec["method"]["max_density"] = 0.0
    report = run_job(parse_spec(spec))
    assert "sparse_entries" in report["parameters"] and report["parameters"]["sparse_entries"] == 0
    model = rankfold.load(tmp_path / "out" / "model")
    q = model.model.layers[1].self_attn.q_proj
    assert q.nnz == 0 and 0 < q.rank <= 64 * 64 // (2 * 128)  # its (1 − ratio) share of triples, no more


def test_an_interrupted_search_resumes_where_it_saved_and_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    whole = run_job(parse_spec(_spec(tiny_model_dir, tmp_path / "whole", steps=6, validate_every=2)))
    spec = parse_spec(_spec(tiny_model_dir, tmp_path / "cut", steps=6, validate_every=2))
    calls, loss = [], search_stage._SearchShards.loss

    def failing(self, batch, mask):
        calls.append(1)
        # the start's held-out score, then per step two masks and after every second step a held-out
        # score: call 12 is the first mask of step 5, after the state saved at step 4
        if len(calls) == 12:
            raise KeyboardInterrupt
        return loss(self, batch, mask)

    monkeypatch.setattr(search_stage._SearchShards, "loss", failing)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    monkeypatch.setattr(search_stage._SearchShards, "loss", loss)
    resumed = run_job(spec)
    cut, uncut = _search_result(tmp_path / "cut"), _search_result(tmp_path / "whole")
    assert cut["resumed_at"] == 4 and uncut["resumed_at"] == 0
    assert cut["loss_per_step"] == uncut["loss_per_step"]
    assert [row[0] for row in uncut["held_out_loss"]] == [0, 2, 4, 6]
    assert cut["held_out_loss"] == uncut["held_out_loss"] and cut["kept_step"] == uncut["kept_step"]
    assert resumed["parameters"] == whole["parameters"]
    assert [r["value"] for r in resumed["rows"]] == pytest.approx([r["value"] for r in whole["rows"]])


def _masks(out) -> dict[str, torch.Tensor]:
    store = LocalStore(out / "artifacts")
    return {key.rsplit("/", 1)[1]: torch.cat([t.flatten() for t in store.get_tensors(key).values()])
            for key in store.list_keys("search/") if not key.endswith("state.safetensors")}


def test_the_held_out_choice_keeps_the_top_k_that_scored_best(tiny_model_dir, tmp_path, monkeypatch):
    """Held-out scores at steps 0, 2, 4, 6 (patched; step 4 best): the stored masks are the top-K at step
    4, as a search stopped there stores them, not the last one (a large lr: the top-Ks differ)."""
    scores = iter([2.0, 3.0, 1.0, 4.0])
    monkeypatch.setattr(search_stage, "_held_out_loss", lambda *args: next(scores))
    spec = lambda out, **options: parse_spec(_spec(tiny_model_dir, tmp_path / out, lr=20.0, **options))  # noqa: E731
    run_job(spec("held", steps=6, validate_every=2))
    result = _search_result(tmp_path / "held")
    assert result["held_out_loss"] == [[0, 2.0], [2, 3.0], [4, 1.0], [6, 4.0]] and result["kept_step"] == 4
    run_job(spec("stopped", steps=4, holdout=0))
    run_job(spec("last", steps=6, holdout=0))
    chosen, stopped, last = (_masks(tmp_path / out) for out in ("held", "stopped", "last"))
    assert chosen.keys() == stopped.keys() and all(torch.equal(chosen[k], stopped[k]) for k in chosen)
    assert any(not torch.equal(chosen[k], last[k]) for k in chosen)


def test_the_held_out_sequences_must_follow_the_searched_ones(tiny_model_dir, tmp_path):
    with pytest.raises(SpecError, match=r"samples \+ holdout = 4 \+ 5 exceeds calibration.num_samples = 8"):
        parse_spec(_spec(tiny_model_dir, tmp_path / "out", holdout=5))
    parse_spec(_spec(tiny_model_dir, tmp_path / "out", holdout=5, steps=0))  # no steps: nothing to choose


def test_a_budget_the_units_cannot_meet_names_the_ratio(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, tmp_path / "out")
    spec["target"]["ratio"] = 0.01
    # robust PCA's own L (λ → 0: S takes all, L keeps little); the default's full-rank triples cover any ratio > 0
    spec["method"].update({"triples": "rpca", "max_density": 0.01, "lam_scale": 0.001})
    with pytest.raises(SpecError, match="target.ratio = 0.01: the budget"):
        run_job(parse_spec(spec))


def test_cap_needs_the_search_allocation(tiny_model_dir, tmp_path):
    spec = tiny_spec_dict(tiny_model_dir, tmp_path / "out", method="cap")
    with pytest.raises(SpecError, match="allocation.kind 'uniform' does not apply to method.name 'cap'"):
        parse_spec(spec)


def test_the_search_shares_flras_fisher_pass_and_the_uniform_rule_plans_none():
    from rankfold.modules.layout import CompressedModule
    from rankfold.orchestrator.model_layout import ModelLayout
    from rankfold.orchestrator.plan import make_plan

    def plan(method: str, allocation: dict, ratio: float = 0.5):
        spec = parse_spec({"model": {"source": "smollm2-135m"}, "method": {"name": method},
                           "target": {"ratio": ratio, "allocation": allocation}, "output": {"dir": "/tmp/unused"},
                           "calibration": {"data": {"path": str(CALIBRATION_TEXT)}}})
        module = CompressedModule("lowrank_sparse", ("mlp.up_proj",), 0, group="mlp_in",
                                  options={"nnz": int(1000 * (1 - ratio)), "entry_cost": 2})  # the ratio's rule
        return make_plan(spec, "model-id", ModelLayout({0: [module]}))

    search = plan("cap", {"kind": "search"})
    assert [s.kind for s in search.stages[:5]] == ["calibrate", "fisher", "rpca", "search", "allocate"]
    assert search["fisher"].digest == plan("svd_llm", {"kind": "flra"})["fisher"].digest
    assert "fisher" not in plan("cap", {"kind": "search", "rule": "uniform"})
    # the same robust PCA serves every ratio and rule; the search does not
    other = plan("cap", {"kind": "search", "rule": "uniform"}, ratio=0.2)
    assert other["rpca"].digest == search["rpca"].digest and other["search"].digest != search["search"].digest


def test_a_uniform_start_stays_uniform_beside_a_palu_cache_that_plans_a_fisher_pass(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    spec = _spec(tiny_model_dir, tmp_path / "out", init="uniform", steps=0)
    spec["target"]["matrices"] = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec["kv_cache"] = {"ratio": 0.5, "group_heads": 1, "rank_multiple": 4, "fisher_samples": 2}
    parsed = parse_spec(spec)

    def weighted(*args):
        raise AssertionError("the search read the Fisher pass it was told not to start from")

    monkeypatch.setattr(search_stage, "_fisher_weighted", weighted)
    report = run_job(parsed)
    assert "fisher" in [row["stage"] for row in report["stages"]]  # Palu's Fisher pass ran in this job
    assert report["parameters"]["counted_compressed"] <= 0.5 * report["parameters"]["counted_dense"]
