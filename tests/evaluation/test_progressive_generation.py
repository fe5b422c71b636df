"""Progressive decoding through the generation evaluator: FLRA's decode order recorded in the checkpoint,
the cost-matched schedule solved on the worker, equal outputs in-process and on Ray actors, and the
skip layout refused before any work."""

from __future__ import annotations

import pytest

from rankfold.evaluation.generation import GenerationOptions, evaluate_generation
from rankfold.evaluation.registry import EvaluationContext
from rankfold.execution.local import LocalExecutor

SCHEDULE = {"shape": "exponential", "decay_tokens": 2.0, "target_ratio": 0.55, "order": "fisher"}


@pytest.fixture(scope="module")
def flra_checkpoint(tiny_model_dir, tmp_path_factory) -> str:
    from rankfold.jobs.spec import parse_spec
    from rankfold.orchestrator.job import run_job
    from tests.conftest import tiny_spec_dict

    spec = tiny_spec_dict(tiny_model_dir, tmp_path_factory.mktemp("flra"), "svd_llm", ratio=0.3)
    spec["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4}
    spec["evaluation"] = {"dense": False}
    return run_job(parse_spec(spec))["checkpoint"]


def _options(shared_data, **extra) -> GenerationOptions:
    return GenerationOptions(name="xsum", data=shared_data / "xsum" / "test_1000.jsonl", limit=3,
                             max_document_tokens=32, max_new_tokens=6, batch_size=2, **extra)


def _context(executor, checkpoint, tmp_path, skip: bool = False) -> EvaluationContext:
    from rankfold.checkpoint import layer_layouts
    from rankfold.models.sources import open_source

    source = open_source(checkpoint)
    layouts = layer_layouts(source.config)
    layout = (lambda i: [{**m, "skip": True} for m in layouts[i]]) if skip else layouts.get
    return EvaluationContext(executor, str(checkpoint), source.num_layers, layout, source.tokenizer(), "float32",
                             tmp_path, "generation test")


def test_checkpoint_records_flra_gains_of_every_rank_module(flra_checkpoint):
    import rankfold
    from rankfold.checkpoint import rank_gains, verify_checkpoint
    from rankfold.models.sources import SafetensorsSource
    from rankfold.modules.progressive import rank_modules

    verify_checkpoint(flra_checkpoint)  # the gains file is checksummed with the shards
    gains = rank_gains(SafetensorsSource(flra_checkpoint))
    modules = rank_modules(rankfold.load(flra_checkpoint))
    assert set(gains) == set(modules)
    assert all(gains[name].shape == (module.rank,) and bool((gains[name] >= 0).all())
               for name, module in modules.items())


@pytest.fixture(scope="module")
def in_process(flra_checkpoint, shared_data, tmp_path_factory):
    return evaluate_generation(_options(shared_data, progressive=SCHEDULE),
                               _context(LocalExecutor(workers=2), flra_checkpoint, tmp_path_factory.mktemp("g")))


def test_cost_matched_schedule_is_solved_and_reported(in_process, flra_checkpoint, shared_data, tmp_path):
    from rankfold.evaluation.generation import prompts_of
    from rankfold.workers.lm import ModelWorker

    row = next(r for r in in_process if r["metric"] == "rougeL")
    assert row["decode_cost"] <= 1 - SCHEDULE["target_ratio"] < row["stored_cost"] <= 0.7 + 1e-9
    assert 0.0 <= row["schedule"]["floor"] < 1.0
    worker = ModelWorker(flra_checkpoint, "float32")
    prompts, _ = prompts_of(_options(shared_data), worker.tokenizer)
    whole = worker.generate(prompts, 6, 3, worker.decode_plan(SCHEDULE, 6)["ranks"])  # one worker, one batch
    assert [s["output"] for s in row["samples"]] == whole
    plain = evaluate_generation(_options(shared_data), _context(LocalExecutor(workers=1), flra_checkpoint,
                                                                 tmp_path))
    assert "decode_cost" not in plain[0]


@pytest.mark.slow  # ~45 s of actor start-up; the sharding itself is ModelWorkers', Ray-tested with zero-shot
def test_ray_actors_decode_alike(in_process, ray_executor, flra_checkpoint, shared_data, tmp_path):
    on_ray = evaluate_generation(_options(shared_data, progressive=SCHEDULE),
                                 _context(ray_executor, flra_checkpoint, tmp_path))
    assert on_ray == in_process


def test_skip_layout_is_refused_before_any_model_loads(flra_checkpoint, shared_data, tmp_path):
    class NoWorkers(LocalExecutor):
        def actors(self, *args, **kwargs):
            raise AssertionError("workers started")

    with pytest.raises(ValueError, match="no nested ranks"):
        evaluate_generation(_options(shared_data, progressive=SCHEDULE),
                            _context(NoWorkers(workers=1), flra_checkpoint, tmp_path, skip=True))


def test_skipcat_job_with_progressive_decoding_is_a_spec_error(tiny_model_dir, shared_data, tmp_path):
    from rankfold.jobs.spec import SpecError, parse_spec
    from rankfold.orchestrator.job import run_job
    from tests.conftest import tiny_spec_dict

    spec = tiny_spec_dict(tiny_model_dir, tmp_path / "out", "skipcat")
    spec["evaluation"] = {"generation": [{"name": "xsum", "data": str(shared_data / "xsum" / "test_1000.jsonl"),
                                          "limit": 2, "progressive": {"target_ratio": 0.5}}]}
    with pytest.raises(SpecError, match=r"evaluation.generation\[0\].progressive .*no nested ranks"):
        run_job(parse_spec(spec))
    assert not (tmp_path / "out" / "model").exists()
