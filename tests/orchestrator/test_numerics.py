"""Silent wrong numbers are errors: a non-finite activation stops the job naming the layer and dtype."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankfold.cli import EXIT_FAILED, main
from rankfold.core.errors import NumericalError
from rankfold.jobs.spec import parse_spec
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict


@pytest.fixture
def overflowing_model(tiny_model_dir, tmp_path):
    """The tiny model with layer 1's MLP scaled so its output overflows float16 (max 65504), not float32."""
    folder = tmp_path / "loud"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in ("gate_proj", "up_proj", "down_proj"):
        tensors[f"model.layers.1.mlp.{name}.weight"] *= 60.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_float16_overflow_in_calibration_names_the_layer_and_dtype(overflowing_model, tmp_path):
    data = tiny_spec_dict(overflowing_model, tmp_path / "fp16")
    data["model"]["dtype"] = "float16"
    with pytest.raises(NumericalError, match=r"layer 1 \(model.dtype float16\).*bfloat16 or float32"):
        run_job(parse_spec(data))
    data["model"]["dtype"] = "float32"  # the same model is fine in float32
    data["output"]["dir"] = str(tmp_path / "fp32")
    data["evaluation"]["perplexity"] = []
    assert run_job(parse_spec(data))["parameters"]["achieved_compression"] >= 0.3


def test_float16_overflow_in_evaluation_exits_1_naming_the_layer(overflowing_model, tmp_path, capsys):
    """svd needs no calibration: the overflow shows in evaluation, which used to report `nan`."""
    import json

    data = tiny_spec_dict(overflowing_model, tmp_path / "out", method="svd")
    data["model"]["dtype"] = "float16"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    assert main(["run", str(spec)]) == EXIT_FAILED
    assert "numerical failure: layer 1 (model.dtype float16)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_importing_rankfold_makes_idle_openmp_threads_sleep():
    """OMP_WAIT_POLICY=PASSIVE unless the environment says otherwise (set before torch loads OpenMP)."""
    import subprocess
    import sys

    code = "import os, rankfold; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
    assert torch.get_num_threads() >= 1
