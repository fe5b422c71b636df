"""The anchored walk as a job (orchestrator/stages/anchored_walk.py): the plain weight reproduces the plain
job, a walk stopped mid-way resumes to the same checkpoint, Ray and in-process agree, bad specs are
refused before anything is written."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import rankfold.workers.anchored_tasks as anchored_tasks
from rankfold.execution.local import LocalExecutor
from rankfold.jobs.spec import FittingSpec, SpecError, parse_spec
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
    report = run_job(_spec(tiny_model_dir, tmp_path / "walk", fitting={"mix": [1.0], "output_correction": False,
                                                                              "output_mix": None},
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
    fitting = {"holdout": 2, "mix": [0.0, 0.5, 1.0], "attention_correction": True, "choose_on": choose_on,
               "output_mix": None}
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
    fitting = {"holdout": 2, "choose_on": "layer", "mix": [0.0, 0.5, 1.0], "output_correction": True, "output_mix": None}
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


@pytest.mark.parametrize("token_weights", [None, "relative"])
def test_the_last_projection_fitted_to_the_layer_output_keeps_the_weight_it_prefers(tmp_path, tiny_model_dir,
                                                                                    monkeypatch, token_weights):
    """fitting.output_mix: each layer's down_proj is fitted to the dense layer output at every candidate
    weight and the one with the smallest held-out layer-output error kept; the other groups stay plain.
    The fit reads the output statistics' own paired sums (weighted alike with relative token weights): the
    group's are not gathered."""
    real, calls = anchored_tasks.anchored_item, []

    def recording(item):
        found = real(item)
        calls.append((item, found[0]))
        return found

    monkeypatch.setattr("rankfold.workers.anchored_shard.anchored_item", recording)
    fitting = {"holdout": 2, "mix": [1.0], "output_mix": [0.0, 0.5, 1.0], "output_correction": True,
               "token_weights": token_weights}
    paired = []
    monkeypatch.setattr(anchored_tasks.PairedStats, "from_tensors",
                        classmethod(lambda cls, tensors, prefix, real=anchored_tasks.PairedStats.from_tensors.__func__:
                                    paired.append(prefix) or real(cls, tensors, prefix)))
    report = run_job(_spec(tiny_model_dir, tmp_path / "out", fitting=fitting), executor=LocalExecutor(workers=2))
    assert "output.paired" in paired and "mlp_out" not in paired
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


def test_the_dense_layer_outputs_are_kept_once_per_layer_and_change_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """The dense layer's outputs, computed once per layer and shard by the last projection's output statistics,
    serve the output correction, the held-out scores and the dense stream's advance: the same checkpoint as
    a walk that recomputes them at every use."""
    from rankfold.workers.anchored_shard import AnchoredShard

    fitting = {"holdout": 2, "mix": [1.0], "output_mix": [0.0, 0.5, 1.0], "output_correction": True}
    made, real_new = [], AnchoredShard._new_outputs
    monkeypatch.setattr(AnchoredShard, "_new_outputs", lambda self, index: made.append(index) or real_new(self, index))
    run_job(_spec(tiny_model_dir, tmp_path / "kept", fitting=fitting), executor=LocalExecutor(workers=2))
    assert sorted(made) == [0, 0, 1, 1]  # two layers, two shards

    real_side, real_outputs = AnchoredShard._dense_side, AnchoredShard.dense_outputs

    def forgetting(real):
        def forget(self, index, *args):
            if self._dense_outputs is not None:
                self._dense_outputs[1].release()
            self._dense_outputs = None
            return real(self, index, *args)
        return forget

    monkeypatch.setattr(AnchoredShard, "_dense_side", forgetting(real_side))
    monkeypatch.setattr(AnchoredShard, "dense_outputs", forgetting(real_outputs))
    run_job(_spec(tiny_model_dir, tmp_path / "recomputed", fitting=fitting), executor=LocalExecutor(workers=2))
    assert len(made) > 4  # recomputed at every use
    kept, recomputed = _checkpoint(tmp_path / "kept"), _checkpoint(tmp_path / "recomputed")
    assert kept.keys() == recomputed.keys() and all(torch.equal(kept[k], recomputed[k]) for k in kept)


def test_o_proj_fitted_toward_the_residual_after_attention_keeps_the_weight_the_layer_output_prefers(
        tmp_path, tiny_model_dir, monkeypatch):
    """fitting.attention_output_mix: each layer's o_proj is fitted toward the dense residual after attention
    at every output_mix weight, and the one kept is the candidate with the smallest held-out error of the
    layer's output (summed over the shards), not of the residual it was fitted to."""
    import rankfold.orchestrator.stages.anchored_walk as walk
    real, scored = walk._choose_on_layer, []

    def recording(shards, i, group, layout, done, item):
        found = real(shards, i, group, layout, done, item)
        scored.append((i, group, item.output_key, found[0]))
        return found

    monkeypatch.setattr(walk, "_choose_on_layer", recording)
    fitting = {"holdout": 2, "mix": [1.0], "output_mix": [0.0, 0.5, 1.0], "attention_output_mix": True}
    report = run_job(_spec(tiny_model_dir, tmp_path / "out", fitting=fitting), executor=LocalExecutor(workers=2))
    assert [(i, group) for i, group, _, _ in scored] == [(0, "attn_out"), (1, "attn_out")]
    for i, _, output_key, found in scored:
        assert output_key  # fitted to the residual after attention (OutputStats gathered)
        (path,) = found["output_anchored"]
        assert path.startswith(f"model.layers.{i}.self_attn.o_proj")
        errors = {w: found[f"layer_error@{w}"][path] for w in (0.0, 0.5, 1.0)}
        assert found["anchored_weight"][path] == min(errors, key=errors.get)
        assert max(errors.values()) > 1.001 * min(errors.values()), errors
    kept = report["diagnostics"]["output_anchored_weights_kept"]
    assert sum(kept.values()) == 4  # o_proj and down_proj of both layers
    with pytest.raises(ValidationError, match="attention_output_mix takes its weights from output_mix"):
        FittingSpec(attention_output_mix=True, output_mix=None)


def test_the_refinement_keeps_factors_no_worse_on_held_out_sequences(tmp_path, tiny_model_dir, monkeypatch):
    """fitting.refine: every layer's kept factors score no worse than the start on the held-out sequences;
    where a step was kept, the checkpoint's factors moved off the closed form and the kept error is lower."""
    import rankfold.orchestrator.stages.anchored_refine as anchored_refine
    real, scores = anchored_refine._heldout_error, []

    def recording(*args):
        scores.append(real(*args))
        return scores[-1]

    monkeypatch.setattr(anchored_refine, "_heldout_error", recording)
    fitting = {"holdout": 2, "output_correction": True, "output_mix": None}
    refined = {**fitting, "refine": {"steps": 6, "lr": 1e-4, "sequences": 6, "checks": 3}}
    run_job(_spec(tiny_model_dir, tmp_path / "plain", fitting=fitting), executor=LocalExecutor(workers=2))
    report = run_job(_spec(tiny_model_dir, tmp_path / "refined", fitting=refined), executor=LocalExecutor(workers=2))
    summary = report["diagnostics"]
    assert len(scores) == 2 * (1 + 3) and summary["refined_layers"] == 2
    per_layer = [scores[:4], scores[4:]]
    kept = [min(range(4), key=lambda j, errors=errors: (errors[j], j)) for errors in per_layer]
    assert summary["refine_steps_kept"] == {str([0, 2, 4, 6][j]): kept.count(j) for j in set(kept)}
    assert summary["mean_refine_heldout_ratio"] == pytest.approx(
        sum(errors[j] / errors[0] for errors, j in zip(per_layer, kept)) / 2)
    assert any(j > 0 for j in kept), per_layer  # some step helps on the tiny model (layer 1: the next fits X̂ ≠ X)
    plain, moved = _checkpoint(tmp_path / "plain"), _checkpoint(tmp_path / "refined")
    assert plain.keys() == moved.keys() and any(not torch.equal(plain[k], moved[k]) for k in plain)
    assert not list((tmp_path / "refined").rglob("*-refined.safetensors"))  # the kept tensors' artifact deleted


def test_the_refinement_rate_and_its_check_points():
    """AA-SVD's schedule: 10 % linear warm-up (never a zero first step), then a cosine from 1 to 0.1; the
    check points end at the last step, never at the start, however many are asked for."""
    from rankfold.orchestrator.stages.anchored_refine import check_points, rate
    rates = [rate(step, 40) for step in range(40)]
    assert rates[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and rates[4] == 1.0
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] == pytest.approx(0.1, abs=0.01)
    assert rate(0, 1) == 0.5
    assert check_points(32, 8) == {4, 8, 12, 16, 20, 24, 28, 32} and check_points(7, 8) == set(range(1, 8))
    assert check_points(1, 8) == {1} and check_points(10, 3) == {4, 7, 10}


def test_a_shard_of_held_out_rows_only_adds_nothing_to_the_refinement(tmp_path, tiny_model_dir):
    """Two shards of four sequences, five held out: the second shard fits none; its zero gradient and
    token count leave the sum the first shard's."""
    fitting = {"holdout": 5, "refine": {"steps": 2, "sequences": 2, "checks": 1}, "output_mix": None}
    report = run_job(_spec(tiny_model_dir, tmp_path / "out", fitting=fitting), executor=LocalExecutor(workers=2))
    assert report["diagnostics"]["refined_layers"] == 2


@pytest.mark.parametrize("where, rewritten", [("descend", 0), ("_rewrite", 1), ("_rewrite", None)])
def test_a_walk_stopped_in_the_refinement_resumes_to_the_same_checkpoint(tmp_path, tiny_model_dir, monkeypatch, where,
                                                                         rewritten):
    """Stopped in layer 1's refinement: during its steps, with one of its group artifacts rewritten, or
    with all of them (before the kept tensors' artifact is deleted)."""
    import rankfold.orchestrator.stages.anchored_refine as anchored_refine
    fitting = {"holdout": 2, "refine": {"steps": 4, "lr": 1e-4, "sequences": 6, "checks": 2}, "output_mix": None}
    run_job(_spec(tiny_model_dir, tmp_path / "whole", fitting=fitting), executor=LocalExecutor(workers=2))
    real, calls = getattr(anchored_refine, where), []

    def stopping(*args):
        calls.append(args)
        if len(calls) == 2:
            if where == "_rewrite":
                store, keys, kept, found = args
                real(store, keys[:rewritten], kept, found)
            raise KeyboardInterrupt("stopped in the refinement")
        return real(*args)

    stopped = _spec(tiny_model_dir, tmp_path / "stopped", fitting=fitting)
    monkeypatch.setattr(anchored_refine, where, stopping)
    with pytest.raises(KeyboardInterrupt):
        run_job(stopped, executor=LocalExecutor(workers=2))
    monkeypatch.setattr(anchored_refine, where, real)
    report = run_job(stopped, executor=LocalExecutor(workers=2))
    assert report["diagnostics"]["refined_layers"] == 2
    assert not list((tmp_path / "stopped").rglob("*-refined.safetensors"))
    first, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "stopped")
    assert first.keys() == resumed.keys() and all((first[k] == resumed[k]).all() for k in first)


def test_ray_and_in_process_walks_agree(tmp_path, tiny_model_dir, ray_executor):
    # the correction's and the output fit's statistics too reduced in a shard on Ray, the layer-output
    # scores summed in the driver
    fitting = {"holdout": 2, "output_correction": True, "choose_on": "layer", "mix": [0.0, 1.0], "output_mix": [0.0, 1.0],
               "refine": {"steps": 2, "sequences": 2, "checks": 1}}  # its gradients summed among the shards too
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
