"""benchmarks/job_memory.py at a tiny size, so its machinery cannot rot: a sharded
synthetic checkpoint is generated, the job runs as a child process (in-process executor here, to
stay fast; the benchmark's default is Ray) while its process tree's RSS and PSS are sampled, and the
ratios and per-stage peaks are written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CALIBRATION_TEXT, REPO, WIKITEXT_TEST


@pytest.mark.realmodel  # the synthetic checkpoint carries SmolLM2's tokenizer
def test_job_memory_benchmark_runs_at_tiny_size(tmp_path, shared_data):
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "eval.txt"  # short: quick to tokenize
    calibration.write_text(CALIBRATION_TEXT.read_text()[:20000])
    evaluation.write_text(WIKITEXT_TEST.read_text()[:20000])
    tiny = ["--layers", "2", "--hidden", "64", "--ffn", "160", "--heads", "4", "--kv-heads", "2",
            "--layers-per-shard", "1", "--samples", "4", "--seq-len", "64", "--batch-size", "2",
            "--window", "64", "--windows", "2", "--executor", "local", "--skip-baseline",
            "--calib-data", str(calibration), "--eval-data", str(evaluation)]
    command = [sys.executable, "-m", "benchmarks.job_memory", "--work", str(tmp_path / "work"),
               "--out", str(tmp_path / "out"), "--interval", "0.05", *tiny]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((tmp_path / "out" / "checkpoint.json").read_text())
    folder = tmp_path / "work" / "llama-2x64-160-float32"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    tensor_bytes = index["metadata"]["total_size"]  # the files add their safetensors headers
    assert result["shards"] == 2 and tensor_bytes < result["checkpoint_bytes"] < tensor_bytes + 65536
    assert result["peak"]["rss"] >= result["peak"]["pss"] > 0
    assert result["ratio_rss"] == pytest.approx(result["peak"]["rss"] / result["checkpoint_bytes"])
    stages = [row["stage"] for row in result["stages"]]
    assert stages[0] == "start-up and preflight" and stages[-1] == "report and shutdown"
    assert stages[1:5] == ["calibrate", "allocate", "decompose", "assemble"]
    assert all(row["report_stage"] for row in result["stages"][1:-1])
    assert all(row["wall_s"] >= 0 for row in result["stages"])
    assert result["executor"] == "local (in-process, cpu)" and result["calibration_tokens"] == 4 * 64
    assert (tmp_path / "out" / "checkpoint.md").read_text().startswith("### Scale: 2-layer synthetic Llama")
