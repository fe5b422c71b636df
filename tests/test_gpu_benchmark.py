"""benchmarks/gpu.py as a dry run on the CPU (`--device cpu`), tiny shapes and the tiny model, so its
machinery cannot rot before it meets a GPU: every part runs, measures and writes its result."""

from __future__ import annotations

import json

from benchmarks import gpu
from tests.conftest import CALIBRATION_TEXT, WIKITEXT_TEST


def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path, tiny_model_dir):
    result = gpu.main(["--device", "cpu", "--scale", "32", "--tokens", "256", "--layer-seq-len", "128",
                       "--repeats", "1", "--model", str(tiny_model_dir), "--calib-samples", "4", "--seq-len", "32",
                       "--eval-tokens", "128", "--calib-data", str(CALIBRATION_TEXT), "--eval-data",
                       str(WIKITEXT_TEST), "--out", str(tmp_path), "--name", "dry"])
    assert result["compared"] == "cpu" and json.loads((tmp_path / "dry.json").read_text())["layer"]
    [job] = result["job"]
    assert {"calibrate", "decompose", "assemble"} <= {stage.split()[0] for stage in job["stages_s"]}
    assert job["perplexity"]["wikitext2 compressed"] > job["perplexity"]["wikitext2 dense"] > 1
    [layer] = result["layer"]
    assert layer["hidden"] == 256 and set(layer["cholesky_s"]) == {"attn_in", "mlp_in", "mlp_out"}
    assert len(layer["svd_llm_s"]) == len(gpu.LAYER_MATRICES)
    assert {row["variant"] for row in result["kernels"]} == {"dense", "lowrank", "skip", "cat", "skipcat"}
