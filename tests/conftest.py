"""Shared fixtures: the offline data folder, the real SmolLM2 source, and a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RANKFOLD_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIBRATION_TEXT = SHARED_DATA / "calibration" / "enwiki_excerpt.txt"
WIKITEXT_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not CALIBRATION_TEXT.is_file():
        pytest.fail(f"offline data not found at {SHARED_DATA} (set RANKFOLD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF source (read layer by layer)."""
    from rankfold.models.sources import open_source

    return open_source("smollm2-135m")


def _tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2) -> Path:
    """A random 2-layer Llama saved as a HF safetensors folder, with SmolLM2's real tokenizer."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = smollm2.tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(len(tokenizer)))
    # Random init has tiny weights; scale up so activations are not near-isotropic noise.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_spec_dict(model_dir: Path, out_dir: Path, method: str = "svd_llm", ratio: float = 0.3) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "method": {"name": method},
        "target": {"ratio": ratio},
        "calibration": {"data": {"path": str(CALIBRATION_TEXT)}, "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "evaluation": {"perplexity": [{"name": "wikitext2", "data": {"path": str(WIKITEXT_TEST), "lines_as_rows": True},
                                       "window": 64, "max_tokens": 512, "batch_size": 2}]},
        "output": {"dir": str(out_dir)},
    }
