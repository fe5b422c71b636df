"""Jobs on a Ray cluster through Ray's Job API: submit, status, logs, cancel, list.

`submit` checks the spec and its inputs here (a bad spec never reaches the cluster), makes every
path in it absolute, and ships it as the job's working directory; the job runs `rankfold run` on the
cluster with the Ray executor, so its progress lines are the job's log. Paths must be readable
where the job runs (the same machine, or a shared file system); artifacts belong in S3 for clusters.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from rankfold.core.redact import has_url_credentials, redact
from rankfold.execution.ray import ClusterError, check_reachable
from rankfold.jobs.spec import EvalSpec, JobSpec, load_any_spec, parse_any_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
METADATA_KEY = "rankfold_job"


def job_api_address(address: str | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else the local dashboard."""
    if address:
        return address
    for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(variable, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def job_client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    url = job_api_address(address)
    if has_url_credentials(url):
        raise ClusterError(f"Ray Job API address {redact(url)}: credentials in a URL are refused")
    check_reachable(url.split("://", 1)[-1])
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot use the Ray Job API at {redact(url)}: {redact(str(err))}") from None


def absolute_spec(spec: JobSpec | EvalSpec) -> dict:
    """The spec as data with every local path made absolute (the job runs in another directory)."""
    data = spec.model_dump(mode="json")
    source = Path(data["model"]["source"])
    if source.exists():
        data["model"]["source"] = str(source.resolve())
    if "calibration" in data:
        _absolute_paths(data["calibration"])
    _absolute_paths(data["evaluation"])
    data["output"]["dir"] = str(Path(data["output"]["dir"]).resolve())
    return data


def _absolute_paths(node: object) -> None:
    """Every `path` (and evaluators' `data` given as a path) in a nested spec section, made absolute."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):
        if key in ("path", "data") and isinstance(value, str):
            node[key] = str(Path(value).resolve())
        else:
            _absolute_paths(value)


def submit(spec_path: str | Path, address: str | None = None, workers: int | None = None) -> str:
    """Validate and submit; returns the submission id."""
    from rankfold.orchestrator.evaluation_run import open_evaluated
    from rankfold.orchestrator.preflight import check_evaluations, job_id, preflight

    spec = load_any_spec(spec_path)
    # a missing model or data file is an error here, not on the cluster
    if isinstance(spec, EvalSpec):
        check_evaluations(spec, open_evaluated(spec))
    else:
        preflight(spec)
    data = absolute_spec(spec)
    data["execution"].update(executor="ray", address=None)  # inside a Ray job, RAY_ADDRESS names the cluster
    if workers is not None:
        data["execution"]["workers"] = workers
    spec = parse_any_spec(data, origin=str(spec_path))
    command = "eval" if isinstance(spec, EvalSpec) else "run"
    client = job_client(address)
    job = job_id(spec)
    with tempfile.TemporaryDirectory(prefix="rankfold-submit-") as folder:
        (Path(folder) / "spec.json").write_text(json.dumps(data, indent=2))
        return client.submit_job(
            entrypoint=f"python -m rankfold.cli {command} spec.json",
            runtime_env={"working_dir": folder},
            submission_id=f"rankfold-{job[:12]}-{int(time.time())}",
            metadata={METADATA_KEY: job, "spec": Path(spec_path).name, "output": data["output"]["dir"]})


def _known(call, submission_id: str):
    try:
        return call()
    except RuntimeError as err:  # the Job API answers an unknown id with a bare RuntimeError
        raise ClusterError(f"job {submission_id}: {err}") from None


def status(submission_id: str, address: str | None = None) -> dict:
    client = job_client(address)
    info = _known(lambda: client.get_job_info(submission_id), submission_id)
    return {"id": submission_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "spec": (info.metadata or {}).get("spec", ""),
            "output": (info.metadata or {}).get("output", "")}


def logs(submission_id: str, address: str | None = None) -> str:
    """The job's log so far. ClusterError when the job is unknown or the cluster unreachable."""
    client = job_client(address)
    return _known(lambda: client.get_job_logs(submission_id), submission_id)


def follow_logs(submission_id: str, address: str | None = None) -> Iterator[str]:
    """The job's log in chunks as they are written, until the job ends. ClusterError as `logs`.
    The Job API streams asynchronously: its stream is driven here on a loop of its own, one chunk a step."""
    import asyncio

    chunks = job_client(address).tail_job_logs(submission_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield _known(lambda: loop.run_until_complete(anext(chunks)), submission_id)
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(chunks.aclose())  # closes the web socket when the caller stops early
        loop.close()


def cancel(submission_id: str, address: str | None = None) -> bool:
    client = job_client(address)
    return bool(_known(lambda: client.stop_job(submission_id), submission_id))


def list_jobs(address: str | None = None) -> list[dict]:
    """rankfold's jobs on the cluster, oldest first."""
    jobs = [job for job in job_client(address).list_jobs() if METADATA_KEY in (job.metadata or {})]
    jobs.sort(key=lambda job: job.start_time or 0)
    return [{"id": job.submission_id, "status": str(job.status.value if hasattr(job.status, "value") else job.status),
             "spec": job.metadata.get("spec", ""), "output": job.metadata.get("output", ""),
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))}
            for job in jobs]
