"""The plan as a graph of typed stages: a new stage kind is one file (here, this module's `count`
kind) plus its registration; wiring is checked against the kind's signature when the plan is made;
a stage receives exactly the outputs it declared, and its digest follows its params and inputs."""

from __future__ import annotations

import logging

import pytest

from rankfold.execution.local import LocalExecutor
from rankfold.orchestrator.graph import PlanBuilder, PlanError
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.metering import StageMeter
from rankfold.orchestrator.runner import run_plan
from rankfold.orchestrator.stages import STAGE_KINDS, Env, StageKind
from rankfold.orchestrator.stages.outputs import Output, Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.store import LocalStore


class Count(Output):
    @property
    def value(self) -> int:
        return self.result["value"]


def count(env: Env, stage: Stage, *, previous: Count | None = None) -> tuple[dict, dict]:
    """A toy kind: params["step"] plus the previous count, if wired."""
    return {"value": stage.params["step"] + (previous.value if previous is not None else 0)}, {}


def needs_statistics(env: Env, stage: Stage, *, statistics: Statistics) -> tuple[dict, dict]:
    return {}, {}


@pytest.fixture
def toy_kinds(monkeypatch):
    for kind in (StageKind("count", count, "1", Count), StageKind("needs_statistics", needs_statistics, "1", Count)):
        monkeypatch.setitem(STAGE_KINDS._entries, kind.kind, kind)


def test_a_toy_kind_in_one_file_runs_in_a_plan_and_reads_its_declared_input(toy_kinds, tmp_path, caplog):
    builder = PlanBuilder()
    builder.add("first", "count", {"step": 2})
    builder.add("second", "count", {"step": 3}, {"previous": "first"})
    plan = builder.plan()
    store = LocalStore(tmp_path / "store")
    env = Env(source=None, shapes={}, store=store, executor=LocalExecutor(), scratch=tmp_path / "scratch")
    caplog.set_level(logging.INFO, logger="rankfold")
    outputs, reused = run_plan(plan, env, Manifest(store, "toy"), StageMeter())
    assert outputs["second"].value == 5 and reused == [] and not caplog.records
    again, reused = run_plan(plan, env, Manifest(store, "toy"), StageMeter())
    assert reused == ["first", "second"] and again["second"].value == 5
    assert caplog.messages == [f"{name}: reusing verified artifacts ({plan[name].digest})" for name in reused]
    assert {record.name for record in caplog.records} == {"rankfold.orchestrator.runner"}


BITS = {"value": 0}  # what the toy `written` kind writes: a recomputation on other threads, other bits


def written(env: Env, stage: Stage, *, previous: Count | None = None) -> tuple[dict, dict]:
    """A toy kind with an artifact (its key fixed by the digest, its bytes by BITS)."""
    key = f"toy/{stage.digest}.json"
    return {"value": BITS["value"] + (previous.value if previous is not None else 0)}, \
        {key: env.store.put_json(key, BITS)}


def test_a_stage_whose_input_was_recomputed_with_other_bits_runs_again(toy_kinds, monkeypatch, tmp_path):
    """The 70B run's resume: a lost factor artifact recomputed (on more threads: other bits) under the same
    digest must not leave the assembled model of the old factors standing; the same bits again do."""
    monkeypatch.setitem(STAGE_KINDS._entries, "written", StageKind("written", written, "1", Count))
    builder = PlanBuilder()
    builder.add("factors", "written", {})
    builder.add("assemble", "count", {"step": 10}, {"previous": "factors"})
    plan = builder.plan()
    store = LocalStore(tmp_path / "store")
    env = Env(source=None, shapes={}, store=store, executor=LocalExecutor(), scratch=tmp_path / "scratch")
    run = lambda: run_plan(plan, env, Manifest(store, "toy"), StageMeter())  # noqa: E731
    monkeypatch.setitem(BITS, "value", 1)
    assert run()[0]["assemble"].value == 11
    store.delete(f"toy/{plan['factors'].digest}.json")  # lost: recomputed with the same bits
    outputs, reused = run()
    assert reused == ["assemble"] and outputs["assemble"].value == 11
    store.delete(f"toy/{plan['factors'].digest}.json")
    monkeypatch.setitem(BITS, "value", 2)  # recomputed with other bits
    outputs, reused = run()
    assert reused == [] and outputs["assemble"].value == 12
    assert run()[1] == ["factors", "assemble"]
    # recomputed by a run that stopped before assembling (a plan of the factors alone: the same digest)
    alone = PlanBuilder()
    alone.add("factors", "written", {})
    store.delete(f"toy/{plan['factors'].digest}.json")
    monkeypatch.setitem(BITS, "value", 3)
    run_plan(alone.plan(), env, Manifest(store, "toy"), StageMeter())
    outputs, reused = run()
    assert reused == ["factors"] and outputs["assemble"].value == 13


def test_an_input_the_kind_does_not_declare_fails_at_plan_time(toy_kinds):
    builder = PlanBuilder()
    builder.add("first", "count", {"step": 1})
    with pytest.raises(PlanError, match="input 'statistics' is not declared by the kind"):
        builder.add("second", "count", {"step": 1}, {"previous": "first", "statistics": "first"})


def test_a_missing_mistyped_or_later_input_fails_at_plan_time(toy_kinds):
    builder = PlanBuilder()
    builder.add("first", "count", {"step": 1})
    with pytest.raises(PlanError, match="required inputs not wired: statistics"):
        builder.add("reader", "needs_statistics")
    with pytest.raises(PlanError, match="expects Statistics, but 'first' gives Count"):
        builder.add("reader", "needs_statistics", inputs={"statistics": "first"})
    with pytest.raises(PlanError, match="not planned before it"):  # so a plan has no cycle
        builder.add("second", "count", {"step": 1}, {"previous": "third"})


def test_a_run_function_can_only_declare_typed_keyword_inputs():
    def untyped(env, stage, *, statistics) -> tuple[dict, dict]:
        return {}, {}

    def positional(env, stage, statistics: Statistics) -> tuple[dict, dict]:
        return {}, {}

    for run in (untyped, positional):
        with pytest.raises(TypeError, match="input 'statistics'"):
            StageKind("bad", run, "1", Count)


def test_the_digest_follows_params_inputs_and_versions(toy_kinds, monkeypatch):
    def digests(step: int = 2, first_step: int = 1) -> tuple[str, str]:
        builder = PlanBuilder()
        builder.add("first", "count", {"step": first_step})
        second = builder.add("second", "count", {"step": step}, {"previous": "first"})
        return builder["first"].digest, second.digest

    first, second = digests()
    assert digests() == (first, second)
    assert digests(step=3)[1] != second
    assert digests(first_step=5) != (first, second) and digests(first_step=5)[1] != second  # an input changed
    monkeypatch.setitem(STAGE_KINDS._entries, "count", StageKind("count", count, "2", Count))
    assert digests()[0] != first


def test_every_registered_kind_declares_typed_inputs_and_an_output():
    for kind in STAGE_KINDS:
        assert issubclass(kind.output, Output), kind.kind
        assert all(issubclass(role.type, Output) for role in kind.roles.values()), kind.kind


def test_palus_fisher_pass_is_the_allocators_only_when_their_settings_agree():
    from rankfold.jobs.spec import parse_spec
    from rankfold.modules.layout import CompressedModule
    from rankfold.orchestrator.model_layout import ModelLayout
    from rankfold.orchestrator.plan import make_plan
    from tests.conftest import CALIBRATION_TEXT

    def plan(kv_samples: int):
        spec = parse_spec({"model": {"source": "smollm2-135m"}, "method": {"name": "svd_llm"},
                           "target": {"ratio": 0.2, "matrices": ["q_proj", "o_proj"],
                                      "allocation": {"kind": "flra", "fisher_samples": 8}},
                           "kv_cache": {"ratio": 0.5, "fisher_samples": kv_samples},
                           "calibration": {"data": {"path": str(CALIBRATION_TEXT)}}, "output": {"dir": "/tmp/unused"}})
        uniform = ModelLayout({0: [CompressedModule("lowrank", ("self_attn.q_proj",), 8, group="attn_in")]})
        return make_plan(spec, "model-id", uniform)

    shared, own = plan(8), plan(16)
    assert shared["kv_allocate"].inputs["fisher"] == "fisher" and "kv_fisher" not in shared
    assert own["kv_allocate"].inputs["fisher"] == "kv_fisher" and own["kv_fisher"].params["samples"] == 16
    assert own["allocate"].inputs == {"fisher": "fisher", "spectra": "spectra"}
