"""`rankfold submit | status | logs | list | cancel` against a real local Ray cluster's Job API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import tiny_spec_dict

pytest.importorskip("ray")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankfold.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait(job: str, api: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _cli("status", job, "--address", api).stdout.split()[1]
        if state in states:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} did not reach {states} in {timeout} s")


def _quick_spec(tiny_model_dir, out) -> dict:
    data = tiny_spec_dict(tiny_model_dir, out)
    data["evaluation"]["dense"] = False  # the compressed model's row is enough here
    return data


@pytest.mark.slow  # ~80 s; the default run covers submit/status/logs/list with the scheduled evaluation below
def test_submit_status_logs_list(tmp_path, tiny_model_dir, ray_cluster):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_quick_spec(tiny_model_dir, tmp_path / "out")))
    submitted = _cli("submit", str(spec), "--address", ray_cluster["api"])
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    assert job.startswith("rankfold-")
    assert _wait(job, ray_cluster["api"], {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        _cli("logs", job, "--address", ray_cluster["api"]).stdout[-3000:]
    log = _cli("logs", job, "--address", ray_cluster["api"]).stdout
    assert "(2/2) calibrate" in log and "compressed" in log and "perplexity wikitext2" in log  # progress, report
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["executor"].startswith("ray (")
    listing = _cli("list", "--address", ray_cluster["api"]).stdout
    assert job in listing and "SUCCEEDED" in listing


def test_cancel_stops_a_running_job(tmp_path, tiny_model_dir, ray_cluster):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["calibration"].update(num_samples=4000, seq_len=256)  # long enough to be cancelled mid-way
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    job = _cli("submit", str(tmp_path / "spec.yaml"), "--address", ray_cluster["api"]).stdout.strip()
    _wait(job, ray_cluster["api"], {"RUNNING"}, timeout=120)
    assert _cli("cancel", job, "--address", ray_cluster["api"]).returncode == 0
    assert _wait(job, ray_cluster["api"], {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"


def test_bad_input_never_reaches_the_cluster(tmp_path, tiny_model_dir, ray_cluster):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["calibration"]["data"]["path"] = str(tmp_path / "missing.txt")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    result = _cli("submit", str(tmp_path / "spec.yaml"), "--address", ray_cluster["api"])
    assert result.returncode == 2 and "missing.txt" in result.stderr and "file not found" in result.stderr
    unknown = _cli("status", "rankfold-nope", "--address", ray_cluster["api"])
    assert unknown.returncode == 2 and "rankfold-nope" in unknown.stderr


@pytest.mark.slow  # ≈ 65 s on 2 cores; the scheduler's decisions are tested in test_schedule.py
def test_scheduler_submits_a_due_evaluation_to_the_cluster(tmp_path, tiny_model_dir, ray_cluster, shared_data):
    """A nightly evaluation-only spec (`rankfold eval` on the cluster): a zero-shot task on Ray actors;
    its metrics reach the history and its plot."""
    job = _quick_spec(tiny_model_dir, tmp_path / "out")
    piqa = {"path": str(shared_data / "piqa" / "valid.jsonl"), "limit": 3}
    evaluation = {"zeroshot": [{"name": "suite", "tasks": {"piqa": piqa}}]}
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({"model": job["model"], "evaluation": evaluation, "output": job["output"],
                                    "execution": {"workers": 1}}))  # one model actor: its start-up is the cost
    registry = str(tmp_path / "schedules.json")
    assert _cli("schedule", str(spec), "--cron", "0 2 * * *", "--address", ray_cluster["api"],
                "--registry", registry).returncode == 0
    early = _cli("scheduler", "--once", "--now", "2000-01-01T00:00", "--registry", registry)
    assert early.returncode == 0 and "submitted" not in early.stdout  # not due yet
    due = _cli("scheduler", "--once", "--now", "2099-01-01T02:00", "--registry", registry)
    assert due.returncode == 0 and "nightly: submitted rankfold-" in due.stdout, due.stdout + due.stderr
    job = due.stdout.split("submitted ")[1].split()[0]
    assert _wait(job, ray_cluster["api"], {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    log = _cli("logs", job, "--address", ray_cluster["api"]).stdout
    assert "rankfold eval" in log and "piqa acc_norm" in log, log[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["executor"].startswith("ray (") and report["variant"] == "dense"
    listing = _cli("list", "--address", ray_cluster["api"]).stdout
    assert job in listing and "SUCCEEDED" in listing
    history = _cli("history", str(spec))
    assert history.returncode == 0 and "piqa acc_norm" in history.stdout
    assert (tmp_path / "out" / "history.png").is_file()


def test_follow_logs_yields_the_chunks_until_the_job_ends_and_names_an_unknown_job(monkeypatch):
    from rankfold.execution.ray import ClusterError
    from rankfold.orchestrator import submit

    class Client:  # the Job API's stream is an async generator of chunks
        async def tail_job_logs(self, job_id: str):
            if job_id == "rankfold-nope":
                raise RuntimeError("Job rankfold-nope does not exist")
            for chunk in ("(1/2) calibrate\n", "(2/2) calibrate\n"):
                yield chunk

    monkeypatch.setattr(submit, "job_client", lambda address=None: Client())
    assert list(submit.follow_logs("rankfold-1")) == ["(1/2) calibrate\n", "(2/2) calibrate\n"]
    with pytest.raises(ClusterError, match="job rankfold-nope"):
        list(submit.follow_logs("rankfold-nope"))
