"""Everything decidable from the spec, the files' headers and the shapes fails before anything is
written or computed, with an error naming the field; the folder then accepts the corrected spec."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from rankfold.cli import EXIT_BAD_INPUT, main
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


def _refused(data: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        run_job(parse_spec(data))


@pytest.mark.parametrize("change, match", [
    (lambda d: d["evaluation"]["perplexity"][0].update(window=256, max_tokens=200),
     r"evaluation.perplexity\[0\] \(wikitext2\): .*fewer than one window of 256"),
    (lambda d: d["target"].update(ratio=0.99), r"target.ratio = 0.99: .*cannot meet it .*largest ratio"),
    (lambda d: d["target"].update(ratio=0.9, allocation={"kind": "flra", "fisher_samples": 4,
                                                         "min_rank_fraction": 0.5}),
     r"min_rank_fraction = 0.5: the minimum ranks alone need"),
])
def test_bad_inputs_fail_before_anything_is_written(tiny_model_dir, tmp_path, change, match):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    change(data)
    _refused(data, match)
    assert not (tmp_path / "out").exists()


def test_a_short_calibration_text_then_its_correction_run_in_the_same_folder(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words of calibration text, far too few for the windows asked. " * 2)
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["evaluation"]["perplexity"] = []
    data["calibration"]["data"] = {"path": str(short)}
    _refused(data, r"calibration.data .*fewer than num_samples=8")
    data["calibration"]["data"] = tiny_spec_dict(tiny_model_dir, tmp_path)["calibration"]["data"]
    report = run_job(parse_spec(data))
    assert report["calibration_tokens"] == 8 * 64


def test_sharded_model_missing_a_shard_exits_2_naming_it(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    save_file({k: tensors[k] for k in half["model-00001-of-00002.safetensors"]}, folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in half.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec_dict(folder, tmp_path / "out")))
    assert main(["run", str(spec_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "model.source" in err and "model-00002-of-00002.safetensors" in err and "missing" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished uniform SVD-LLM job (its spec dict and report)."""
    data = tiny_spec_dict(tiny_model_dir, tmp_path_factory.mktemp("finished") / "out")
    return data, run_job(parse_spec(data))


def test_a_corrected_evaluation_entry_keeps_the_compression(finished):
    """Evaluation entries are not the job's identity: correcting one in a finished job's folder runs only
    the new evaluation; the compression's stages are reused and its id (manifest, history) stays."""
    from rankfold.orchestrator.preflight import job_id

    data, first = copy.deepcopy(finished[0]), finished[1]
    data["evaluation"]["perplexity"][0].update(max_tokens=256)
    data["evaluation"]["perplexity"].append({**data["evaluation"]["perplexity"][0], "name": "again", "window": 32})
    second = run_job(parse_spec(data))
    assert job_id(parse_spec(data)) == first["artifacts"]["manifest"].split("/")[1]
    assert second["artifacts"]["manifest"] == first["artifacts"]["manifest"]
    assert {"calibrate", "decompose", "assemble"} <= set(second["reused_stages"])
    assert {row["name"] for row in second["rows"]} >= {"wikitext2", "again"}
    recorded = json.loads((Path(data["output"]["dir"]) / "job.json").read_text())
    assert recorded["evaluation"]["perplexity"][0]["max_tokens"] == 256
    data["target"]["ratio"] = 0.4  # the compression changed: another job
    with pytest.raises(SpecError, match="holds another job"):
        run_job(parse_spec(data))


def _generation(shared_data, **options) -> dict:
    return {"name": "xsum", "data": str(shared_data / "xsum" / "test_1000.jsonl"), "limit": 3,
            "max_document_tokens": 128, "max_new_tokens": 8, **options}


@pytest.mark.parametrize("entry, allocation, match", [
    ({"progressive": {"target_ratio": 0.5, "order": "fisher"}}, None,
     r"generation\[0\] \(xsum\): progressive.order = 'fisher' needs FLRA's decode gains"),
    ({"progressive": {"target_ratio": 0.2}}, None, r"progressive.target_ratio = 0.2: the stored model already costs"),
    ({"progressive": {"target_ratio": 0.9, "shape": "step", "step_at": 8}}, None,
     r"progressive.target_ratio = 0.9: even floor 0 costs"),
    ({"progressive": {"target_ratio": 0.9, "shape": "step", "step_at": 8, "order": "fisher"}},
     {"kind": "flra", "fisher_samples": 4}, r"even floor 0 costs"),
    ({"max_document_tokens": 1024, "max_new_tokens": 64}, None,
     r"generation\[0\] \(xsum\): document \d+: its prompt of \d+ tokens plus max_new_tokens = 64 exceeds "
     r"the model's context of 512"),
])
def test_a_generation_entry_decidable_from_the_spec_fails_before_any_work(tiny_model_dir, shared_data, tmp_path,
                                                                         entry, allocation, match):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    if allocation:
        data["target"]["allocation"] = allocation
    data["evaluation"] = {"generation": [_generation(shared_data, **entry)]}
    _refused(data, match)
    assert not (tmp_path / "out").exists()


def test_a_perplexity_window_past_the_context_is_a_spec_error(tiny_model_dir, tmp_path):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["evaluation"]["perplexity"][0].update(window=1024, max_tokens=2048)
    _refused(data, r"perplexity\[0\] \(wikitext2\): window = 1024 tokens exceeds the model's context of 512")


def test_preflight_decode_units_are_the_written_checkpoints(finished, tiny_model_dir):
    """What preflight decides a schedule on (the planned layout) is what the worker solves it on."""
    import rankfold
    from rankfold.methods.plrd import decode_units
    from rankfold.models.sources import SafetensorsSource
    from rankfold.orchestrator.preflight import planned_decode, preflight, recorded_decode

    spec = parse_spec(finished[0])
    source, shapes = preflight(spec)
    checkpoint = Path(finished[1]["checkpoint"])
    written = decode_units(rankfold.load(checkpoint))
    assert planned_decode(spec, source, shapes).units == written
    assert recorded_decode(SafetensorsSource(checkpoint)).units == written
    assert not recorded_decode(SafetensorsSource(checkpoint)).gains


def test_eval_of_a_checkpoint_checks_its_schedule_before_loading(finished, shared_data, tmp_path, monkeypatch):
    from rankfold.jobs.spec import parse_any_spec
    from rankfold.orchestrator.evaluation_run import run_evaluation

    monkeypatch.setattr("rankfold.workers.lm.model_from_source", lambda *a, **k: pytest.fail("model loaded"))
    spec = {"model": {"source": finished[1]["checkpoint"]}, "output": {"dir": str(tmp_path / "eval")},
            "evaluation": {"generation": [_generation(shared_data, progressive={"target_ratio": 0.5,
                                                                                  "order": "fisher"})]}}
    with pytest.raises(SpecError, match="needs FLRA's decode gains"):
        run_evaluation(parse_any_spec(spec))
    assert not (tmp_path / "eval").exists()
