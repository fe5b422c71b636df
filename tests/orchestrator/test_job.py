"""The whole job on a tiny random Llama: checkpoint, report, and agreement between the streamed
pipeline and whole-model transformers evaluation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankfold
from rankfold.checkpoint import INDEX_NAME, CheckpointError
from rankfold.data.text import load_text, tokenize
from rankfold.evaluation.report import metric_table
from rankfold.jobs.spec import parse_spec
from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.lowrank import LowRankLinear
from rankfold.modules.shared import SharedLowRankLinear
from rankfold.orchestrator.job import run_job
from rankfold.storage.store import LocalStore
from rankfold.workers.streamed_perplexity import make_windows, model_perplexity
from tests.conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("job") / "out"
    spec = parse_spec(tiny_spec_dict(tiny_model_dir, out))
    report = run_job(spec)
    return spec, report, out


def _in_memory_compressed(model_dir, out, layout_json):
    """The dense model with the job's layout applied and its factor artifacts loaded (no checkpoint)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_layout(model, [CompressedModule.from_json(entry) for entry in layout_json])
    store = LocalStore(out / "artifacts")
    fragment = {}
    for key in sorted(store.root.glob("factors/*/*.safetensors")):
        layer = int(key.name.split("-")[1])
        for name, tensor in store.get_tensors(str(key.relative_to(store.root))).items():
            fragment[f"model.layers.{layer}.{name}"] = tensor
    missing, unexpected = model.load_state_dict(fragment, strict=False)
    assert not unexpected and not any(key.endswith((".A", ".B", ".A_prime")) for key in missing)
    return model.eval()


def test_report_and_artifacts(finished_job):
    spec, report, out = finished_job
    assert (out / "model" / INDEX_NAME).is_file() and (out / "report.json").is_file()
    assert json.loads((out / "report.json").read_text())["parameters"] == report["parameters"]
    assert report["parameters"]["achieved_compression"] >= spec.target.ratio
    assert len(report["ranks"]) == 2 * 7
    assert {row["stage"] for row in report["stages"]} >= {"calibrate", "decompose", "assemble", "evaluate perplexity compressed wikitext2"}
    row = metric_table(report["rows"])[0]
    assert row["tokens"] == 512 and row["windows"] == 8
    assert 1 < row["dense"] < row["compressed"]


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "cat", "skip", "skipcat"])
def test_checkpoint_round_trip_gives_equal_logits(method, tmp_path, tiny_model_dir):
    data = tiny_spec_dict(tiny_model_dir, tmp_path / method, method=method)
    data["evaluation"]["perplexity"] = []
    report = run_job(parse_spec(data))
    loaded = rankfold.load(tmp_path / method / "model")
    reference = _in_memory_compressed(tiny_model_dir, tmp_path / method, report["layout"])
    tokens = torch.randint(0, loaded.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)
    compressed = (LowRankLinear, SharedLowRankLinear)
    ranks = {name: module.rank for name, module in loaded.named_modules() if isinstance(module, compressed)}
    assert ranks == report["ranks"] and len(ranks) == 2 * 7
    assert report["parameters"]["achieved_compression"] >= 0.3
    shared = [m for m in report["layout"] if m["kind"] == "shared"]
    assert len(shared) == {"svd": 0, "asvd": 0, "svd_llm": 0, "cat": 4, "skip": 14, "skipcat": 8}[method]
    if method in ("skip", "skipcat"):
        assert 1.0 <= report["diagnostics"]["max_skip_condition"] < 1e4


def test_streamed_perplexity_equals_whole_model_perplexity(finished_job, tiny_model_dir):
    spec, report, out = finished_job
    ppl = spec.evaluation.perplexity[0]
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    windows = make_windows(tokenize(load_text(ppl.data), dense_tokenizer(tiny_model_dir)), ppl.window, ppl.max_tokens)
    row = metric_table(report["rows"])[0]
    assert model_perplexity(dense, windows) == pytest.approx(row["dense"], rel=1e-5)
    assert model_perplexity(rankfold.load(out / "model"), windows) == pytest.approx(row["compressed"], rel=1e-5)


def dense_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_plain_transformers_refuses_the_compressed_folder(finished_job):
    _, _, out = finished_job
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out / "model")


def test_corrupted_or_truncated_checkpoint_is_a_clear_error(finished_job, tmp_path):
    import shutil

    _, _, out = finished_job
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "model", damaged)
    shard = damaged / "layers-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside a tensor: safetensors itself cannot notice
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layers-00001.safetensors is corrupted"):
        rankfold.load(damaged)

    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="layers-00001.safetensors"):
        rankfold.load(damaged, verify=False)  # even unverified, truncation is caught on read

    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        rankfold.load(damaged)
    (damaged / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="unfinished"):
        rankfold.load(damaged)


def test_rerun_reuses_verified_stages_and_recomputes_damaged_ones(finished_job):
    spec, report, out = finished_job
    shards = lambda: json.loads((out / "model" / INDEX_NAME).read_text())["metadata"]["sha256"]  # noqa: E731
    before = shards()
    again = run_job(spec)
    assert set(again["reused_stages"]) >= {"calibrate", "decompose", "assemble"}
    assert metric_table(again["rows"]) == metric_table(report["rows"]) and shards() == before

    # A damaged factor artifact: decompose runs again, recomputes it, and the checkpoint is bit-identical.
    store = LocalStore(out / "artifacts")
    damaged = store.list_keys(f"factors/{report['artifacts']['digests']['decompose']}/")[0]
    store.path(damaged).write_bytes(store.path(damaged).read_bytes()[:-8] + b"garbage!")
    shutil.rmtree(out / "model")
    third = run_job(spec)
    assert "calibrate" in third["reused_stages"] and "decompose" not in third["reused_stages"]
    assert store.verify(damaged) and shards() == before


def test_spilled_calibration_gives_identical_statistics(tmp_path, tiny_model_dir, monkeypatch):
    """max_resident_mb forces activation chunks to disk; the statistics must not change."""
    import rankfold.workers.activations as activations

    spills = []
    real_save = activations.save_file
    monkeypatch.setattr(activations, "save_file", lambda tensors, path: (spills.append(path), real_save(tensors, path)))
    data = tiny_spec_dict(tiny_model_dir, tmp_path / "spilled")
    data["calibration"]["max_resident_mb"] = 1
    data["calibration"]["num_samples"] = 96  # 96 × 64 tokens × 64 hidden × 4 B = 1.5 MiB per layer: past 1 MiB
    data["evaluation"]["perplexity"] = []
    digest = run_job(parse_spec(data))["artifacts"]["digests"]["calibrate"]
    assert len(spills) >= 8  # a third of each layer's 24 chunks, for the embeddings and layer 0's outputs
    monkeypatch.setattr(activations, "save_file", real_save)
    data["calibration"]["max_resident_mb"] = 1024
    data["output"]["dir"] = str(tmp_path / "resident")
    run_job(parse_spec(data))
    for layer in (0, 1):
        key = f"stats/{digest}/layer-{layer:05d}.safetensors"
        spilled = LocalStore(tmp_path / "spilled" / "artifacts").get_tensors(key)
        resident = LocalStore(tmp_path / "resident" / "artifacts").get_tensors(key)
        assert spilled.keys() == resident.keys()
        for name in spilled:
            assert torch.equal(spilled[name], resident[name]), name


def test_ill_conditioned_skip_block_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    import yaml

    from rankfold.cli import EXIT_FAILED, main

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out", method="skipcat")
    data["method"]["max_condition"] = 1.0001  # every real block is worse conditioned than this
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "spec.yaml")]) == EXIT_FAILED
    assert "cond(A₁)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model" / INDEX_NAME).exists()  # no finished checkpoint claimed


def test_interrupted_job_resumes_at_its_first_unfinished_stage(tmp_path, tiny_model_dir, monkeypatch):
    import rankfold.orchestrator.stages.assemble as stages

    spec = parse_spec(tiny_spec_dict(tiny_model_dir, tmp_path / "out", method="skip"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the driver stopped (Ctrl-C) during assembly

    monkeypatch.setattr(stages, "assemble_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec)
    monkeypatch.undo()
    resumed = run_job(spec)
    assert resumed["reused_stages"][:3] == ["calibrate", "allocate", "decompose"]
    assert "assemble" not in resumed["reused_stages"]
    assert {row["stage"] for row in resumed["stages"]} >= {"assemble"} and "calibrate" not in {
        row["stage"] for row in resumed["stages"]}
    rankfold.load(tmp_path / "out" / "model")  # complete and verified


def test_a_new_method_version_recomputes_its_factors_and_reuses_the_calibration(tmp_path, tiny_model_dir, monkeypatch):
    import dataclasses

    from rankfold.methods.registry import METHODS

    data = tiny_spec_dict(tiny_model_dir, tmp_path / "out")
    data["evaluation"]["perplexity"] = []
    spec = parse_spec(data)
    first = run_job(spec)
    monkeypatch.setitem(METHODS._entries, "svd_llm", dataclasses.replace(METHODS.get("svd_llm"), version="bumped"))
    again = run_job(spec)
    assert "calibrate" in again["reused_stages"]
    assert not {"decompose", "assemble"} & set(again["reused_stages"])
    digests, before = again["artifacts"]["digests"], first["artifacts"]["digests"]
    assert digests["calibrate"] == before["calibrate"] and digests["decompose"] != before["decompose"]
    assert digests["assemble"] != before["assemble"]


def test_a_stored_head_under_tied_config_is_the_one_loaded_and_evaluated(tiny_model_dir, tmp_path):
    """Config ties the head to the embeddings but the file carries its own: the report scores the
    file's head, so `rankfold.load` must give that model too, not re-tie it."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "untied"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    head = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(5))
    save_file({**tensors, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
    spec = parse_spec(tiny_spec_dict(folder, tmp_path / "out"))
    report = run_job(spec)
    ppl = spec.evaluation.perplexity[0]
    loaded = rankfold.load(tmp_path / "out" / "model")
    assert torch.equal(loaded.lm_head.weight, head) and not loaded.config.tie_word_embeddings
    windows = make_windows(tokenize(load_text(ppl.data), dense_tokenizer(folder)), ppl.window, ppl.max_tokens)
    row = metric_table(report["rows"])[0]
    assert model_perplexity(loaded, windows) == pytest.approx(row["compressed"], rel=1e-5)


def test_save_pretrained_round_trips_through_transformers_or_is_refused(finished_job, tmp_path):
    """A loaded compressed model saved with save_pretrained loads back (transformers and rankfold.load)
    with equal logits; transformers without rankfold refuses the unknown model type instead of
    initialising the dense projections at random."""
    import subprocess
    import sys

    _, _, out = finished_job
    model = rankfold.load(out / "model")
    model.save_pretrained(tmp_path / "saved")
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
        for again in (AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), rankfold.load(tmp_path / "saved")):
            assert torch.equal(again(tokens).logits, expected)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r})"
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert refused.returncode != 0 and "rankfold_llama" in refused.stderr


def test_export_writes_a_job_as_a_folder_with_its_remote_code(finished_job, tmp_path, capsys):
    """`rankfold export OUTPUT_DIR NEW` writes the job's checkpoint with its remote code; it loads (here
    through rankfold's registered classes of the same model type) with rankfold.load's logits; an existing
    target is refused and left alone. (Loading with rankfold blocked, every structure and form: tests/export/.)"""
    from rankfold.cli import main

    _, _, out = finished_job
    assert main(["export", str(out), str(tmp_path / "exported")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True)
    assert (tmp_path / "exported" / "modeling_rankfold.py").is_file()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, rankfold.load(out / "model")(tokens).logits,
                                   rtol=0, atol=0)
        torch.testing.assert_close(rankfold.load(tmp_path / "exported")(tokens).logits, exported(tokens).logits,
                                   rtol=0, atol=0)
    before = sorted(p.name for p in (tmp_path / "exported").iterdir())
    assert main(["export", str(out / "model"), str(tmp_path / "exported"), "--form", "dense"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == before
