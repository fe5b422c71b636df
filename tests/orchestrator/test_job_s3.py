"""The whole job with its artifacts in S3 (a real S3 HTTP server on 127.0.0.1): every artifact lands
in the bucket, a re-run resumes from it, and a bad bucket stops the job before anything is written."""

from __future__ import annotations

import shutil

import pytest
import torch

import rankfold
from rankfold.cli import EXIT_BAD_INPUT, main
from rankfold.jobs.spec import parse_spec
from rankfold.models.sources import ModelSourceError, SafetensorsSource, open_source
from rankfold.orchestrator.job import run_job
from rankfold.storage.store import S3Store
from rankfold.storage.stored_model import StoredCheckpointSource
from tests.conftest import tiny_spec_dict


def _s3_spec(tiny_model_dir, out, endpoint, bucket):
    data = tiny_spec_dict(tiny_model_dir, out, method="skipcat")
    data["output"]["s3"] = {"bucket": bucket, "prefix": "team/jobs", "endpoint_url": endpoint}
    return parse_spec(data)


def test_job_with_s3_artifacts_resumes_from_the_bucket(tmp_path, tiny_model_dir, s3_endpoint, s3_bucket, monkeypatch):
    spec = _s3_spec(tiny_model_dir, tmp_path / "out", s3_endpoint, s3_bucket)
    report = run_job(spec)
    store = S3Store(s3_bucket, prefix="team/jobs", endpoint_url=s3_endpoint)
    digests = report["artifacts"]["digests"]
    keys = store.list_keys()
    assert report["artifacts"]["store"].startswith(f"s3://{s3_bucket}/team/jobs")
    assert sum(k.startswith(f"stats/{digests['calibrate']}/") and k.endswith(".safetensors") for k in keys) == 2
    assert sum(k.startswith(f"stats/{digests['calibrate']}/") and k.endswith(".json") for k in keys) == 2  # summaries
    assert sum(k.startswith(f"factors/{digests['decompose']}/") for k in keys) == 2 * 4
    assert f"checkpoints/{digests['assemble']}/rankfold.safetensors.index.json" in keys
    assert report["artifacts"]["manifest"] in keys
    assert not (tmp_path / "out" / "artifacts").exists()  # nothing duplicated locally
    logits = rankfold.load(tmp_path / "out" / "model")(torch.arange(12)[None]).logits

    shutil.rmtree(tmp_path / "out" / "model")  # the local checkpoint is lost: fetched back from S3
    again = run_job(spec)
    assert set(again["reused_stages"]) >= {"calibrate", "decompose", "assemble"}
    torch.testing.assert_close(rankfold.load(tmp_path / "out" / "model")(torch.arange(12)[None]).logits, logits,
                               rtol=0, atol=0)

    # Any node reads the checkpoint from the store itself (Ray evaluation does): same tensors.
    stored = StoredCheckpointSource(store.ref(), f"checkpoints/{digests['assemble']}", cache=tmp_path / "cache")
    local = SafetensorsSource(tmp_path / "out" / "model")
    assert not list((tmp_path / "cache").rglob("layers-*.safetensors"))  # shards fetched on first use only
    assert sorted(stored.keys()) == sorted(local.keys())
    monkeypatch.setenv("RANKFOLD_CACHE", str(tmp_path / "worker-cache"))
    reopened = open_source(stored.location)  # as a worker does: the location string is all it gets
    for index in range(stored.num_layers):
        for name, tensor in reopened.layer_state(index).items():
            assert torch.equal(tensor, local.layer_state(index)[name]), name
    with pytest.raises(ModelSourceError, match="no checkpoint under"):
        StoredCheckpointSource(store.ref(), "checkpoints/nothing-here", cache=tmp_path / "cache")


def test_missing_bucket_stops_the_job_before_writing(tmp_path, tiny_model_dir, s3_endpoint, capsys):
    import yaml

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["output"]["s3"] = {"bucket": "no-such-bucket", "endpoint_url": s3_endpoint}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "spec.yaml")]) == EXIT_BAD_INPUT
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bucket", ["UPPER", "a", "has_underscore"])
def test_invalid_bucket_name_is_a_spec_error(tmp_path, tiny_model_dir, bucket):
    from rankfold.jobs.spec import SpecError

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["output"]["s3"] = {"bucket": bucket}
    with pytest.raises(SpecError, match="output.s3.bucket"):
        parse_spec(data)
