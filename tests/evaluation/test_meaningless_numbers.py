"""No evaluator reports a number that means nothing: a forward that overflows is an error naming the
layer and dtype (zero-shot and generation as the perplexity), and inputs past the model's context are
recorded where lm-eval truncates them (zero-shot) — the spec-time refusals are in test_preflight.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rankfold.core.errors import NumericalError
from rankfold.evaluation.generation import GenerationOptions, evaluate_generation
from rankfold.evaluation.perplexity import PerplexityOptions, evaluate_perplexity
from rankfold.evaluation.registry import EvaluationContext
from rankfold.evaluation.zeroshot import ZeroShotOptions, evaluate_zeroshot
from rankfold.execution.local import LocalExecutor


def _variant(tiny_model_dir, folder, config=None, scale=None):
    """A copy of the tiny model with config fields changed and/or layer 0's down_proj scaled."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, folder)
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    if scale:
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.mlp.down_proj.weight"] *= scale
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def overflowing(tiny_model_dir, tmp_path_factory):
    """Fine in float32, inf in float16 from layer 0 on (its MLP output ~1e6 > float16's 65504)."""
    return _variant(tiny_model_dir, tmp_path_factory.mktemp("overflow") / "m", scale=1e6)


def _context(folder, tmp_path, dtype="float32") -> EvaluationContext:
    from rankfold.models.sources import open_source

    source = open_source(folder)
    return EvaluationContext(LocalExecutor(workers=1), str(folder), source.num_layers, lambda i: None,
                             source.tokenizer(), dtype, tmp_path, "test")


def _zeroshot(shared_data, task="arc_easy", path="arc/ARC-Easy-Test.jsonl", limit=4) -> ZeroShotOptions:
    return ZeroShotOptions(name="z", tasks={task: {"path": str(shared_data / path), "limit": limit}}, batch_size=4)


def _generation(shared_data) -> GenerationOptions:
    return GenerationOptions(name="g", data=shared_data / "xsum" / "test_1000.jsonl", limit=2, max_new_tokens=4,
                             max_document_tokens=64)


@pytest.mark.parametrize("evaluate", ["perplexity", "zeroshot", "generation"])
def test_an_overflowing_forward_is_an_error_naming_layer_and_dtype(overflowing, shared_data, tmp_path, evaluate):
    options = {"perplexity": lambda: PerplexityOptions(name="p", data={"path": str(shared_data / "wikitext2" /
                                                                                     "wiki.test.raw")},
                                                       window=32, max_tokens=64),
               "zeroshot": lambda: _zeroshot(shared_data), "generation": lambda: _generation(shared_data)}[evaluate]()
    run = {"perplexity": evaluate_perplexity, "zeroshot": evaluate_zeroshot, "generation": evaluate_generation}
    with pytest.raises(NumericalError, match="float16"):
        run[evaluate](options, _context(overflowing, tmp_path, "float16"))
    if evaluate != "perplexity":  # the streamed perplexity names its layer in its own words
        with pytest.raises(NumericalError, match="decoder layer 0"):
            run[evaluate](options, _context(overflowing, tmp_path, "float16"))
    rows = run[evaluate](options, _context(overflowing, tmp_path, "float32"))  # the same model is fine in float32
    assert all(torch.isfinite(torch.tensor(float(row["value"]))) for row in rows)


def test_zero_shot_records_documents_cut_to_the_context(tiny_model_dir, shared_data, tmp_path, caplog):
    short = _variant(tiny_model_dir, tmp_path / "short", config={"max_position_embeddings": 48})
    options = _zeroshot(shared_data, "boolq", "boolq/val.jsonl", 4)
    rows = evaluate_zeroshot(options, _context(short, tmp_path))
    cut = rows[0]["truncated"]
    assert 0 < cut <= 4 and all(row.get("truncated", cut) == cut for row in rows[:-1])
    assert "exceed the model's context" in caplog.text
    full = evaluate_zeroshot(options, _context(tiny_model_dir, tmp_path))
    assert full[0]["truncated"] < cut
