"""Everything decidable from the spec, the files' headers and the shapes fails before anything is
written or computed, with an error naming the field; the folder then accepts the corrected spec."""

from __future__ import annotations

import json
import shutil

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
