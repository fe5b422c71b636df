"""The anchored walk as a job (orchestrator/stages/anchored_walk.py): the plain weight reproduces the plain
job, a walk stopped mid-way resumes to the same checkpoint, Ray and in-process agree, bad specs are
refused before anything is written."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

import rankfold.workers.anchored_tasks as anchored_tasks
from rankfold.execution.local import LocalExecutor
from rankfold.jobs.spec import SpecError, parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


def _spec(model_dir, out, method: str = "skipcat", fitting: dict | None = None, **calibration):
    data = tiny_spec_dict(model_dir, out, method=method, ratio=0.4)
    data["evaluation"]["perplexity"] = []
    data["calibration"].update(calibration)
    if fitting is not None:
        data["fitting"] = fitting
    return parse_spec(data)


def _checkpoint(out) -> dict:
    tensors = {}
    for path in sorted((out / "model").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_the_plain_weight_gives_the_plain_jobs_factors(tmp_path, tiny_model_dir):
    """w = 1 through the walk: the same checkpoint as the plain job (float64 Gram products)."""
    run_job(_spec(tiny_model_dir, tmp_path / "plain", gram_product_dtype="float64"))
    report = run_job(_spec(tiny_model_dir, tmp_path / "walk", fitting={"mix": [1.0], "output_correction": False},
                           gram_product_dtype="float64"))
    assert "anchored" in report["artifacts"]["digests"] and "decompose" not in report["artifacts"]["digests"]
    plain, walked = _checkpoint(tmp_path / "plain"), _checkpoint(tmp_path / "walk")
    assert plain.keys() == walked.keys()
    for key, value in plain.items():
        assert (value - walked[key]).abs().max() <= 1e-5 * value.abs().max(), key


# stopped in layer 1 (of 2): after its first group is fitted; after o_proj's correction and all four
# groups, before down_proj's; choosing the weight on the layer's output, after its candidates are scored
@pytest.mark.parametrize("task, stop_after, choose_on", [("anchored_item", 5, "module"), ("correction_item", 3, "module"),
                                                         ("keep_candidate", 5, "layer")])
def test_a_stopped_walk_resumes_to_the_same_checkpoint(tmp_path, tiny_model_dir, monkeypatch, task, stop_after,
                                                       choose_on):
    fitting = {"holdout": 2, "mix": [0.0, 0.5, 1.0], "attention_correction": True, "choose_on": choose_on}
    spec = _spec(tiny_model_dir, tmp_path / "whole", fitting=fitting)
    whole = run_job(spec, executor=LocalExecutor(workers=2))
    assert whole["diagnostics"]["anchored_weights_kept"] and whole["diagnostics"]["output_correction_weights_kept"]
    real, calls = getattr(anchored_tasks, task), []

    def stopping(item):
        calls.append(item)
        if len(calls) > stop_after:
            raise KeyboardInterrupt("stopped mid-walk")
        return real(item)

    stopped = _spec(tiny_model_dir, tmp_path / "stopped", fitting=fitting)
    monkeypatch.setattr(f"rankfold.workers.anchored_shard.{task}", stopping)
    with pytest.raises(KeyboardInterrupt):
        run_job(stopped, executor=LocalExecutor(workers=2))
    monkeypatch.setattr(f"rankfold.workers.anchored_shard.{task}", real)
    run_job(stopped, executor=LocalExecutor(workers=2))
    first, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "stopped")
    assert first.keys() == resumed.keys() and all((first[k] == resumed[k]).all() for k in first)


def test_the_layer_output_choice_keeps_the_candidate_the_layer_prefers(tmp_path, tiny_model_dir, monkeypatch):
    """choose_on: layer scores every weight by the held-out layer-output error: at the first group the two
    streams agree (X̂ = X), so every weight is the plain fit and scores the same; past it they differ."""
    real, calls = anchored_tasks.keep_candidate, []

    def recording(item):
        found = real(item)
        calls.append((item.candidates.layer_prefix, item.errors, found[0]["anchored_weight"]))
        return found

    monkeypatch.setattr("rankfold.workers.anchored_shard.keep_candidate", recording)
    fitting = {"holdout": 2, "choose_on": "layer", "mix": [0.0, 0.5, 1.0], "output_correction": True}
    report = run_job(_spec(tiny_model_dir, tmp_path / "out", fitting=fitting), executor=LocalExecutor(workers=2))
    assert len(calls) == 2 * 4 and sum(report["diagnostics"]["anchored_weights_kept"].values()) == 2 * 4
    assert sum(report["diagnostics"]["output_correction_weights_kept"].values()) == 2  # down_proj's only
    spreads = []
    for _, errors, kept in calls:
        assert set(errors) == {0.0, 0.5, 1.0} and all(error > 0 for error in errors.values())
        assert set(kept.values()) == {min(errors, key=errors.get)}
        spreads.append((max(errors.values()) - min(errors.values())) / min(errors.values()))
    assert spreads[0] < 1e-6 and min(spreads[1:]) > 1e-3, spreads
    assert not list((tmp_path / "out").rglob("*-w*.safetensors"))  # every candidate deleted


def test_the_last_projection_fitted_to_the_layer_output_keeps_the_weight_it_prefers(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """fitting.output_mix: each layer's down_proj is fitted to the dense layer output at every candidate
    weight and the one with the smallest held-out layer-output error kept; the other groups stay plain."""
    real, calls = anchored_tasks.anchored_item, []

    def recording(item):
        found = real(item)
        calls.append((item, found[0]))
        return found

    monkeypatch.setattr("rankfold.workers.anchored_shard.anchored_item", recording)
    fitting = {"holdout": 2, "mix": [1.0], "output_mix": [0.0, 0.5, 1.0], "output_correction": True}
    report = run_job(_spec(tiny_model_dir, tmp_path / "out", fitting=fitting), executor=LocalExecutor(workers=2))
    summary = report["diagnostics"]
    assert summary["anchored_weights_kept"] == {"1.0": 2 * 3} and sum(summary["output_anchored_weights_kept"].values()) == 2
    outputs = [(item, found) for item, found in calls if item.output_key]
    assert [item.group for item, _ in outputs] == ["mlp_out", "mlp_out"] and len(calls) == 2 * 4
    for item, found in outputs:
        (path,) = found["output_anchored"]  # down_proj (SkipCat names it by its skip block)
        assert path.startswith(item.layer_prefix + "mlp.down_proj")
        errors = {w: found[f"heldout_error@{w}"][path] for w in ("0.0", "0.5", "1.0")}
        assert found["output_anchored"] == {path: 1} and str(found["anchored_weight"][path]) == min(errors, key=errors.get)
        assert max(errors.values()) > 1.001 * min(errors.values()), errors  # the candidates differ on held-out rows
    assert not list((tmp_path / "out").rglob("*-output.safetensors"))  # the statistics deleted


def test_ray_and_in_process_walks_agree(tmp_path, tiny_model_dir, ray_executor):
    # the correction's and the output fit's statistics too reduced in a shard on Ray, the layer-output
    # scores summed in the driver
    fitting = {"holdout": 2, "output_correction": True, "choose_on": "layer", "mix": [0.0, 1.0], "output_mix": [0.0, 1.0]}
    run_job(_spec(tiny_model_dir, tmp_path / "local", fitting=fitting), executor=LocalExecutor(workers=2))
    run_job(_spec(tiny_model_dir, tmp_path / "ray", fitting=fitting), executor=ray_executor)
    local, remote = _checkpoint(tmp_path / "local"), _checkpoint(tmp_path / "ray")
    assert local.keys() == remote.keys() and all((local[k] == remote[k]).all() for k in local)


@pytest.mark.parametrize("change, message", [
    ({"method": {"name": "wanda"}}, "fitting.kind anchored fits whitened methods"),
    ({"fitting": {"holdout": 8}}, "leaves no calibration sequence"),
    ({"fitting": {"mix": [0.5, 1.5]}}, "must lie in"),
])
def test_specs_the_walk_cannot_fit_are_refused(tmp_path, tiny_model_dir, change, message):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["fitting"] = {}
    data.update(change)
    with pytest.raises(SpecError, match=message):
        parse_spec(data)
    assert not (tmp_path / "out").exists()
