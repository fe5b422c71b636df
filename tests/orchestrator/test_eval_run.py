"""`rankfold eval`: evaluation without compression — results are stage records (re-runs reuse them,
a compression job on the same store reuses the dense model's), every run goes to the history, and bad
input is refused before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rankfold.cli import main
from rankfold.jobs.spec import EvalSpec, parse_any_spec, parse_spec
from rankfold.orchestrator.evaluation_run import run_evaluation
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


def _eval_spec(model: Path | str, out: Path, job: dict, **evaluation) -> dict:
    return {"model": {"source": str(model)}, "evaluation": {"perplexity": job["evaluation"]["perplexity"], **evaluation},
            "output": {"dir": str(out)}}


def test_eval_reuses_its_records_and_shares_the_dense_ones(tiny_model_dir, tmp_path):
    job = tiny_spec_dict(tiny_model_dir, tmp_path / "job")
    spec = parse_any_spec(_eval_spec(tiny_model_dir, tmp_path / "eval", job))
    assert isinstance(spec, EvalSpec)
    first = run_evaluation(spec)
    (row,) = first["rows"]
    assert (row["evaluator"], row["variant"], row["metric"]) == ("perplexity", "dense", "perplexity")
    again = run_evaluation(spec)
    assert again["reused_stages"] == ["evaluate perplexity dense wikitext2"] and again["rows"] == first["rows"]
    # A compression job on the same store: its dense evaluation is the one recorded above.
    report = run_job(parse_spec(job), store=_store_of(tmp_path / "eval"))
    assert "evaluate perplexity dense wikitext2" in report["reused_stages"]
    history = main(["history", str(_write(tmp_path / "e.yaml", _eval_spec(tiny_model_dir, tmp_path / "eval", job)))])
    assert history == 0 and (tmp_path / "eval" / "history.png").is_file()
    # The compressed checkpoint evaluated on its own, as a folder and from the store: labelled
    # compressed, the job's value.
    in_job = [r for r in report["rows"] if r["variant"] == "compressed"][0]
    stored = f"store:checkpoints/{report['artifacts']['digests']['assemble']}"
    for k, model in enumerate((report["checkpoint"], stored)):
        spec = parse_any_spec(_eval_spec(model, tmp_path / f"eval-{k}", job))
        compressed = run_evaluation(spec, store=_store_of(tmp_path / "eval"))
        assert compressed["rows"][0]["variant"] == "compressed"
        assert compressed["rows"][0]["value"] == pytest.approx(in_job["value"], rel=1e-6)


def _store_of(folder: Path):
    from rankfold.storage.store import LocalStore

    return LocalStore(folder / "artifacts")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_input_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import rankfold.workers.lm as lm

    monkeypatch.setattr(lm, "model_from_source", lambda *a, **k: pytest.fail("a model was loaded"))
    job = tiny_spec_dict(tiny_model_dir, tmp_path / "job")
    broken = tmp_path / "dev.jsonl"
    broken.write_text('{"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "1"}\n{"sentence": \n')
    spec = _eval_spec(tiny_model_dir, tmp_path / "eval", job,
                      zeroshot=[{"name": "s", "tasks": {"winogrande": {"path": str(broken)}}}])
    assert main(["eval", str(_write(tmp_path / "a.yaml", spec))]) == 2
    assert "evaluation.zeroshot[0] (s):" in capsys.readouterr().err and not (tmp_path / "eval").exists()
    for bad, message in ((spec | {"evaluation": {}}, "evaluation: no entries"),
                         (spec | {"model": {"source": str(tmp_path / "nowhere")}}, "model.source"),
                         (spec | {"evaluation": {"generation": [{"name": "x", "data": "x.jsonl", "prompt": "hi"}]}},
                          "evaluation.generation.0.prompt")):
        assert main(["eval", str(_write(tmp_path / "b.yaml", bad))]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", str(_write(tmp_path / "job.yaml", job))]) == 2
    assert "run it with `rankfold run`" in capsys.readouterr().err
    assert main(["run", str(_write(tmp_path / "b.yaml", spec))]) == 2
    assert "run it with `rankfold eval`" in capsys.readouterr().err


def test_submitted_eval_specs_carry_absolute_paths(tiny_model_dir, tmp_path, monkeypatch):
    from rankfold.orchestrator.submit import absolute_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text("{}\n")
    spec = parse_any_spec({"model": {"source": str(tiny_model_dir)}, "output": {"dir": "out"}, "evaluation": {
        "zeroshot": [{"name": "s", "tasks": {"piqa": {"path": "x.jsonl"}}}],
        "generation": [{"name": "g", "data": "x.jsonl"}]}})
    data = absolute_spec(spec)
    assert data["evaluation"]["zeroshot"][0]["tasks"]["piqa"]["path"] == str(tmp_path / "x.jsonl")
    assert data["evaluation"]["generation"][0]["data"] == str(tmp_path / "x.jsonl")
    assert data["output"]["dir"] == str(tmp_path / "out") and json.dumps(data)
