"""GGUF files of every family rankfold reads them for, written as llama.cpp's converter writes them
(tests/models/gguf_files.py): the source gives exactly the Hugging Face tensors, per layer and per
matrix (Gemma's shifted norms, llama's permuted q/k rows and a mixture's stacked experts undone), and
a SkipCat + FLRA + Palu job on the GGUF gives the folder's perplexities (Qwen2 by default, the other
families whose tiny config a GGUF carries whole marked slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rankfold.evaluation.report import metric_table
from rankfold.jobs.spec import parse_spec
from rankfold.models.architecture import ARCHITECTURES
from rankfold.models.sources import GGUFSource, ModelSourceError, SafetensorsSource
from rankfold.orchestrator.job import run_job
from tests.conftest import tiny_spec_dict, tiny_tokenizer
from tests.models.gguf_files import write_gguf
from tests.models.test_families import FAMILIES

GGUF_FAMILIES = sorted(name for name in ARCHITECTURES.names() if ARCHITECTURES.get(name).gguf)


def test_families_read_from_gguf():
    assert GGUF_FAMILIES == ["gemma2", "gemma3_text", "llama", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(512)


@pytest.fixture(scope="module", params=GGUF_FAMILIES)
def written(request, tmp_path_factory, tokenizer, monkeypatch_module):
    """(model_type, safetensors folder, GGUF file) of one random 2-layer model of the family."""
    config_class, extra = FAMILIES[request.param]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, rms_norm_eps=2.0 ** -17, **extra)  # a float32 GGUF holds it exactly
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norms away from 1 and biases away from 0: a missed shift shows
                param.add_(0.1 * torch.randn_like(param))
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf")
    path = write_gguf(root / "model.gguf", model, tokenizer)
    # the folder gets the GGUF's tokenizer as transformers converts it (its class follows the model_type;
    # the tiny byte-level BPE under Qwen2's class splits text otherwise): both jobs see the same tokens
    AutoTokenizer.from_pretrained(root, gguf_file=path.name).save_pretrained(root / "hf")
    return request.param, root / "hf", path


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """The GGUF metadata cache in this module's own folder."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RANKFOLD_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield patch
    patch.undo()


def test_gguf_tensors_equal_the_safetensors_ones(written):
    model_type, folder, path = written
    gguf, reference = GGUFSource(path), SafetensorsSource(folder)
    assert gguf.config.model_type == model_type and gguf.num_layers == reference.num_layers
    torch.testing.assert_close(gguf.embedding(), reference.embedding(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gguf.final_norm(), reference.final_norm(), rtol=1e-6, atol=1e-6)
    for i in range(reference.num_layers):
        ours, theirs = gguf.layer_state(i), reference.layer_state(i)
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
        prefix = reference.architecture.layer_prefix.format(i=i)
        for member in (m for group in reference.architecture.groups for m in group.members):
            key = f"{prefix}{member}.weight"
            assert gguf.matrix_shape(key) == reference.matrix_shape(key)
            torch.testing.assert_close(gguf.matrix(key), reference.matrix(key), rtol=1e-6, atol=1e-6)


# Families whose tiny test config a GGUF carries whole: Gemma's query_pre_attn_scalar and Gemma 3's local
# RoPE base and layer pattern are not GGUF metadata (transformers keeps its defaults: the released models')
GGUF_JOBS = ("qwen2", "qwen3", "phi3", "qwen2_moe", "qwen3_moe")


@pytest.mark.parametrize("written", [pytest.param(f, marks=() if f == "qwen2" else pytest.mark.slow) for f in GGUF_JOBS],
                         indirect=True)
def test_a_gguf_job_equals_the_folder_job(written, tmp_path):
    """SkipCat + FLRA + Palu on the GGUF gives the safetensors folder's perplexities (dense and compressed)."""
    model_type, folder, path = written
    data = tiny_spec_dict(path, tmp_path / "out", method="skipcat", ratio=0.3)
    matrices = ["o_proj", "gate_proj", "up_proj", "down_proj"] + ([] if model_type == "phi3" else ["q_proj"])
    data["target"].update({"allocation": {"kind": "flra", "fisher_samples": 4}, "matrices": matrices})
    data["kv_cache"] = {"name": "palu", "ratio": 0.5, "rank_multiple": 4}
    from_gguf = metric_table(run_job(parse_spec(data))["rows"])[0]
    data["model"]["source"], data["output"] = str(folder), {"dir": str(tmp_path / "hf")}
    from_folder = metric_table(run_job(parse_spec(data))["rows"])[0]
    assert from_gguf["dense"] == pytest.approx(from_folder["dense"], rel=1e-6)
    assert from_gguf["compressed"] == pytest.approx(from_folder["compressed"], rel=1e-5)


def test_a_family_not_read_from_gguf_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("RANKFOLD_CACHE", str(tmp_path / "cache"))
    config_class, extra = FAMILIES["granite"]
    model = AutoModelForCausalLM.from_config(config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, **extra))
    path = write_gguf(tmp_path / "granite.gguf", model, tokenizer)
    with pytest.raises(ModelSourceError, match="granite.*not supported yet|granite.*not tested"):
        GGUFSource(path)
