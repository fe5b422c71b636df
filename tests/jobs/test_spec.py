"""Job spec validation: every bad input is one clear error naming the field and value; nothing is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from rankfold.cli import EXIT_BAD_INPUT, main
from rankfold.jobs.spec import SpecError, load_spec, parse_spec
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.preflight import job_id, preflight, prepare_output
from rankfold.storage.store import LocalStore
from tests.conftest import tiny_spec_dict


@pytest.fixture
def good(tmp_path, tiny_model_dir) -> dict:
    return tiny_spec_dict(tiny_model_dir, tmp_path / "out")


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_valid_spec_parses_with_defaults(good):
    spec = parse_spec(good)
    assert spec.target.matrices == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert spec.method.name == "svd_llm" and spec.calibration.seed == 0


def test_unknown_field_is_named(good):
    good["calibration"]["num_sample"] = 3
    message = _error(good)
    assert "calibration.num_sample" in message and "Extra inputs are not permitted" in message


def test_wrong_type_is_named_with_value(good):
    good["calibration"]["seq_len"] = "long"
    message = _error(good)
    assert "calibration.seq_len" in message and '"long"' in message


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_outside_open_unit_interval(good, ratio):
    good["target"]["ratio"] = ratio
    message = _error(good)
    assert "target.ratio" in message and str(ratio) in message


def test_unknown_method_and_method_option(good):
    good["method"] = {"name": "svd_lm"}
    assert "method" in _error(good)
    good["method"] = {"name": "svd", "alpha": 0.5}
    assert "method.svd.alpha" in _error(good)


def test_text_source_needs_exactly_one_of_path_or_dataset(good):
    good["calibration"]["data"] = {"path": "a.txt", "dataset": "wikitext"}
    assert "calibration.data" in _error(good)


def test_repeated_matrices_rejected(good):
    good["target"]["matrices"] = ["q_proj", "q_proj"]
    assert "target.matrices" in _error(good)


def test_missing_calibration_file_fails_preflight(good):
    good["calibration"]["data"]["path"] = "/nonexistent/cal.txt"
    with pytest.raises(SpecError, match=r"calibration\.data\.path = '/nonexistent/cal.txt': file not found"):
        preflight(parse_spec(good))


def test_missing_model_fails_preflight(good):
    good["model"]["source"] = "/nonexistent/model"
    with pytest.raises(SpecError, match=r"model\.source = '/nonexistent/model'"):
        preflight(parse_spec(good))


def test_output_dir_of_another_job_is_refused_and_kept(good):
    spec = parse_spec(good)
    store = LocalStore(Path(good["output"]["dir"]) / "artifacts")
    out = prepare_output(spec, store)
    Manifest(store, job_id(spec)).record("calibrate", "d1", {})  # the first job completed a stage
    (out / "precious.txt").write_text("keep me")
    other = copy.deepcopy(good)
    other["target"]["ratio"] = 0.4
    with pytest.raises(SpecError, match="holds another job"):
        prepare_output(parse_spec(other), store)
    assert (out / "precious.txt").read_text() == "keep me"
    assert json.loads((out / "job.json").read_text())["target"]["ratio"] == good["target"]["ratio"]


def test_a_folder_whose_job_completed_nothing_accepts_a_corrected_spec(good):
    store = LocalStore(Path(good["output"]["dir"]) / "artifacts")
    prepare_output(parse_spec(good), store)
    corrected = copy.deepcopy(good)
    corrected["target"]["ratio"] = 0.4
    out = prepare_output(parse_spec(corrected), store)
    assert json.loads((out / "job.json").read_text())["target"]["ratio"] == 0.4


def test_memory_budget_is_not_part_of_the_job_identity(good):
    spec = parse_spec(good)
    more = copy.deepcopy(good)
    more["calibration"]["max_resident_mb"] = 64
    more["execution"] = {"workers": 3}
    assert job_id(parse_spec(more)) == job_id(spec)


def test_yaml_and_json_files_load(tmp_path, good):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "s.json").write_text(json.dumps(good))
    assert load_spec(tmp_path / "s.yaml") == load_spec(tmp_path / "s.json")


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["target"].update(ratio=1.2), "target.ratio"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["model"].update(source="/nonexistent/model.gguf"), "model.source"),
    (lambda d: d["evaluation"]["perplexity"][0]["data"].update(path="/nope.raw"), "evaluation.perplexity[0].data.path"),
])
def test_cli_bad_spec_exits_nonzero_and_writes_nothing(tmp_path, good, capsys, mutate, needle):
    mutate(good)
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(good))
    assert main(["run", str(spec_file)]) == EXIT_BAD_INPUT
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_spec_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "absent.yaml")]) == EXIT_BAD_INPUT
    assert "job spec file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_job_specs_are_valid_and_pass_preflight(path, monkeypatch):
    from rankfold.jobs.spec import EvalSpec, load_any_spec
    from rankfold.orchestrator.evaluation_run import open_evaluated
    from rankfold.orchestrator.preflight import check_evaluations

    monkeypatch.chdir(path.parents[1])  # their paths are written for the repository root
    spec = load_any_spec(path)
    if isinstance(spec, EvalSpec):  # `rankfold eval` specs: the model opens, every evaluation's data checks
        check_evaluations(spec, open_evaluated(spec))
    else:
        preflight(spec)
    assert spec.output.dir == Path("runs") / path.stem


def test_evaluation_entries_of_one_evaluator_need_distinct_names(good):
    good["evaluation"]["perplexity"].append(dict(good["evaluation"]["perplexity"][0]))
    with pytest.raises(SpecError, match="evaluation.perplexity: names must differ .*repeated: wikitext2"):
        parse_spec(good)


def test_a_job_written_before_an_optional_field_existed_is_the_same_job(good):
    """An older rankfold's job.json lacks a field added since (its default None): same job, folder reused."""
    good["evaluation"]["generation"] = [{"name": "xsum", "data": good["calibration"]["data"]["path"]}]
    spec = parse_spec(good)
    store = LocalStore(Path(good["output"]["dir"]) / "artifacts")
    out = prepare_output(spec, store)
    Manifest(store, job_id(spec)).record("calibrate", "d1", {})
    older = json.loads((out / "job.json").read_text())
    del older["evaluation"]["generation"][0]["progressive"]  # the field an upgrade added
    (out / "job.json").write_text(json.dumps(older, sort_keys=True, separators=(",", ":")))
    assert prepare_output(spec, store) == out
    assert json.loads((out / "job.json").read_text())["evaluation"]["generation"][0]["progressive"] is None


def test_the_former_allocation_kind_fisher_still_parses_as_flra_with_a_warning(good):
    good["target"]["allocation"] = {"kind": "fisher", "fisher_samples": 4}
    with pytest.warns(FutureWarning, match="'fisher' is now 'flra'"):
        spec = parse_spec(good)
    assert spec.target.allocation.kind == "flra" and spec.target.allocation.fisher_samples == 4
    good["target"]["allocation"]["kind"] = "flra"
    assert parse_spec(good).canonical_json() == spec.canonical_json()  # the same job


def test_an_evaluation_section_written_twice_is_named_with_its_lines(tmp_path, good):
    """PyYAML keeps the last of two equal keys: the first `evaluation:` would vanish without a word."""
    body = yaml.safe_dump({k: v for k, v in good.items() if k != "evaluation"}, sort_keys=False)
    second = yaml.safe_dump({"evaluation": good["evaluation"]}).splitlines()
    text = "evaluation: {dense: false}\n" + body + "\n".join(second) + "\n"
    (tmp_path / "twice.yaml").write_text(text)
    line = text.splitlines().index("evaluation:") + 1
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "twice.yaml")
    message = str(info.value)
    assert str(tmp_path / "twice.yaml") in message and "'evaluation'" in message
    assert f"at line 1 and line {line}" in message


@pytest.mark.parametrize("method", ["method: {name: svd_llm, name: svd}\n", "method:\n  name: svd_llm\n  name: svd\n"])
def test_a_nested_duplicate_key_is_named_too(tmp_path, good, method, capsys):
    text = method + yaml.safe_dump({k: v for k, v in good.items() if k != "method"})
    (tmp_path / "nested.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"key 'name' is given twice in one mapping, at line \d+ and line \d+"):
        load_spec(tmp_path / "nested.yaml")
    assert main(["run", str(tmp_path / "nested.yaml")]) == EXIT_BAD_INPUT  # the CLI says so, no traceback
    assert "key 'name' is given twice" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_json_spec_with_a_duplicate_key_is_refused(tmp_path, good):
    text = json.dumps(good)[:-1] + ', "target": {"ratio": 0.5}}'
    (tmp_path / "twice.json").write_text(text)
    with pytest.raises(SpecError, match="key 'target' is given twice"):
        load_spec(tmp_path / "twice.json")


KEY_ID, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("place, field", [
    (lambda d: d["output"].update(s3={"bucket": "rankfold", "endpoint_url": f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000"}),
     "output.s3.endpoint_url"),
    (lambda d: d.update(execution={"executor": "ray", "address": f"ray://{KEY_ID}:{SECRET}@head:10001"}),
     "execution.address"),
    (lambda d: d["evaluation"]["perplexity"][0].update(data={"dataset": f"https://{KEY_ID}:{SECRET}@hub/x"}),
     "evaluation.perplexity[0].data.dataset"),
])
def test_credentials_in_a_url_are_refused_naming_the_field_not_the_secret(good, place, field):
    place(good)
    message = _error(good)
    assert field in message and "credentials in a URL are refused" in message
    assert SECRET not in message and KEY_ID not in message


def test_cli_refuses_credentials_without_printing_or_storing_them(tmp_path, good, capsys):
    good["output"]["s3"] = {"bucket": "rankfold", "endpoint_url": f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000"}
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(good))
    assert main(["run", str(tmp_path / "s3.yaml")]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "output.s3.endpoint_url" in captured.err and "127.0.0.1:9000" in captured.err
    assert SECRET not in captured.err + captured.out and KEY_ID not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # no job.json holding it


def test_a_credential_shaped_value_in_another_error_is_masked(good):
    good["execution"] = {"workers": f"aws_secret_access_key={SECRET}"}
    message = _error(good)
    assert "execution.workers" in message and SECRET not in message
