"""`target.allocation.kind: fisher`: Fisher + spectra + global allocation stages in the real job."""

from __future__ import annotations

import json

import pytest

from rankfold.evaluation.report import metric_table
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


def fisher_spec(model_dir, out, method="svd_llm", ratio=0.3, **allocation):
    data = tiny_spec_dict(model_dir, out, method=method, ratio=ratio)
    data["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4, **allocation}
    return data


@pytest.mark.parametrize("method", ["svd_llm", "skipcat"])
def test_fisher_allocation_meets_the_budget_with_uneven_ranks(tiny_model_dir, tmp_path, method):
    report = run_job(parse_spec(fisher_spec(tiny_model_dir, tmp_path / "out", method)))
    parameters = report["parameters"]
    assert 0.3 <= parameters["achieved_compression"] < 0.3 + 0.02  # within one rank of the budget
    assert len(set(report["ranks"].values())) > 2  # the allocator differentiated the matrices
    assert report["allocation"]["kind"] == "flra" and report["allocation"]["batches"] == 4
    stages = [row["stage"] for row in report["stages"]]
    assert stages[:5] == ["calibrate", "fisher", "spectra", "allocate", "decompose"]
    digests = report["artifacts"]["digests"]
    keys = {str(p.relative_to(tmp_path / "out" / "artifacts")) for p in (tmp_path / "out" / "artifacts").rglob("*.safetensors")}
    assert sum(k.startswith(f"fisher/{digests['fisher']}/") for k in keys) == 2
    assert sum(k.startswith(f"spectra/{digests['spectra']}/") for k in keys) == 2 * 4  # layers × input groups
    row = metric_table(report["rows"])[0]
    assert row["compressed"] < 10 * row["dense"]


def test_rerun_reuses_fisher_spectra_and_allocation(tiny_model_dir, tmp_path):
    spec = parse_spec(fisher_spec(tiny_model_dir, tmp_path / "out"))
    first = run_job(spec)
    again = run_job(spec)
    assert {"calibrate", "fisher", "spectra", "allocate", "decompose", "assemble"} <= set(again["reused_stages"])
    assert again["ranks"] == first["ranks"]


@pytest.mark.parametrize("change, message", [
    ({"method": {"name": "svd"}}, "needs a whitened method"),
    ({"target": {"ratio": 0.3, "allocation": {"kind": "flra", "fisher_samples": 99}}}, "exceeds calibration.num_samples"),
    ({"target": {"ratio": 0.3, "allocation": {"kind": "flra", "min_rank_fraction": 1.5}}}, "min_rank_fraction"),
])
def test_bad_allocation_specs_are_named(tiny_model_dir, tmp_path, change, message):
    data = fisher_spec(tiny_model_dir, tmp_path / "out")
    data.update(change)
    with pytest.raises(SpecError, match=message):
        parse_spec(data)
    assert not (tmp_path / "out").exists()


def test_a_budget_too_small_for_minimum_ranks_is_a_clear_error(tiny_model_dir, tmp_path):
    spec = parse_spec(fisher_spec(tiny_model_dir, tmp_path / "out", ratio=0.99, min_rank_fraction=0.5))
    with pytest.raises(SpecError, match="target.ratio = 0.99 with target.allocation.min_rank_fraction = 0.5"):
        run_job(spec)


def test_two_jobs_on_one_store_share_calibration_fisher_and_spectra(tiny_model_dir, tmp_path):
    """Stage records are content-addressed in the store: a second job at another ratio reuses the
    first one's calibration, Fisher sums and spectra (they do not depend on the ratio)."""
    from rankfold.storage.store import LocalStore

    store = LocalStore(tmp_path / "shared")
    first = run_job(parse_spec(fisher_spec(tiny_model_dir, tmp_path / "a")), store=store)
    data = fisher_spec(tiny_model_dir, tmp_path / "b")
    data["target"]["ratio"] = 0.4
    second = run_job(parse_spec(data), store=store)
    assert {"calibrate", "fisher", "spectra", "evaluate perplexity dense wikitext2"} <= set(second["reused_stages"])
    assert "allocate" not in second["reused_stages"] and second["ranks"] != first["ranks"]


def test_spectra_tasks_reserve_their_estimated_memory(tiny_model_dir, tmp_path, monkeypatch):
    """Each spectra task asks the executor for its group's `spectra_bytes` (on Ray: the `memory` resource),
    as decomposition tasks do — two 70B down_proj groups' spectra (11.4 GB each) must not share 24 GB."""
    from rankfold.allocators.flra import spectra_bytes, spectra_flops
    from rankfold.execution.local import LocalExecutor

    asked, map_ = {}, LocalExecutor.map

    def recording_map(self, fn, items, stage, work=None, memory=None):
        asked[stage] = (work, memory)
        return map_(self, fn, items, stage, work, memory)

    monkeypatch.setattr(LocalExecutor, "map", recording_map)
    run_job(parse_spec(fisher_spec(tiny_model_dir, tmp_path / "out")))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    work, memory = asked["spectra"]
    assert len(memory) == 2 * 4 and spectra_bytes(ffn, [hidden]) in memory
    assert spectra_flops(ffn, [hidden]) in work  # operations, not bytes: the executor picks threads by them
    assert memory.index(spectra_bytes(ffn, [hidden])) == work.index(spectra_flops(ffn, [hidden]))
