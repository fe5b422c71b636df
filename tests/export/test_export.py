"""`rankfold export`: every structure (low rank, shared, skip, low rank + sparse, Palu's latent KV cache,
folded or not, quantised) on the tiny Llama, and every family with a skip layout, written as a folder
that a Python without rankfold (imports of it blocked) loads with `trust_remote_code=True`, giving the
compressed model's logits and greedy tokens; the `lowrank` and `dense` forms too. One subprocess loads
every folder (the loads dominate the cost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankfold.export.bundle import runtime_sources
from rankfold.export.folder import FORMS, write_folder
from rankfold.export.forms import ExportError
from rankfold.methods.palu_cache import replaced_paths
from rankfold.methods.structure import LOWRANK, SHARED, SHARED_SKIP, plan_layer
from rankfold.models.architecture import architecture_for
from rankfold.modules.layout import CompressedModule
from rankfold.modules.transformers_hook import compressed_config
from tests.conftest import tiny_tokenizer
from tests.models.test_families import FAMILIES

LOADER = Path(__file__).with_name("load_without_rankfold.py")
PROMPT, NEW_TOKENS = 6, 5


def _config(model_type: str, vocab: int, **changes):
    config_class, extra = FAMILIES[model_type]
    return config_class(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True, rms_norm_eps=1e-5, **(extra | changes))


def _latent(arch, prefix: str, fold: bool, bits: int) -> CompressedModule:
    options = {"group_heads": 1, "key_ranks": [8, 6], "value_ranks": [8, 4], "fold_values": fold, "bits": bits,
               "group": 8, "residual": 3, "value_bias": False}
    return CompressedModule("latent_kv", tuple(prefix + path for path in replaced_paths(arch)), 0,
                            f"{prefix}self_attn", options=options)


def _layout(config, structure: str) -> list[CompressedModule]:
    """Full-path layout of `structure` over both layers of a model of `config`."""
    arch = architecture_for(config)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config)
    arch.prepare(dense)
    layout = []
    for i in range(config.num_hidden_layers):
        prefix = arch.layer_prefix.format(i=i)
        shapes = {m: tuple(dense.get_submodule(prefix + m).weight.shape) for g in arch.groups for m in g.members}
        groups = [(g.name, g.members) for g in arch.groups]
        if structure == "sparse":
            modules = [CompressedModule("lowrank_sparse", (m,), 3 * (j % 2), group=name,
                                        options={"nnz": 40, "entry_cost": 2})
                       for name, members in groups for j, m in enumerate(members)]
        else:
            plan = {"lowrank": LOWRANK, "shared": SHARED, "skip": SHARED_SKIP}[structure.split("+")[0]]
            if "+latent" in structure:
                shapes = {m: s for m, s in shapes.items() if not m.endswith(("k_proj", "v_proj", "qkv_proj", "o_proj"))}
            modules = plan_layer(plan, groups, shapes, 0.4)
        layout += [m.prefixed(prefix) for m in modules]
        if "+latent" in structure:
            layout.append(_latent(arch, prefix, fold=structure.endswith("folded"), bits=16 if "16" in structure else 4))
    return layout


def compressed_model(model_type: str, structure: str, vocab: int, **changes) -> torch.nn.Module:
    """A random model of the family with `structure` applied, its tensors filled (valid permutations,
    sorted sparse indices); float32, eval mode. `changes`: config fields to override."""
    config = _config(model_type, vocab, **changes)
    config.rankfold = {"layout": [m.to_json() for m in _layout(config, structure)], "dtype": "float32"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(compressed_config(config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.05 if "embed" in name else 0.3
            param.copy_(torch.randn(param.shape, generator=generator) * scale + (1.0 if "norm" in name else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("permutation"):
                buffer.copy_(torch.randperm(buffer.numel(), generator=generator))
            elif name.endswith("S_indices"):
                module = model.get_submodule(name.rpartition(".")[0])
                total = module.in_features * module.out_features
                buffer.copy_(torch.randperm(total, generator=generator)[:buffer.numel()].sort().values)
    return model.eval()


CASES = [("llama", s, "native") for s in ("lowrank", "shared", "skip", "sparse", "lowrank+latent",
                                          "lowrank+latent folded", "skip+latent")] + \
        [("llama", s, form) for s in ("shared", "skip", "sparse", "skip+latent16") for form in ("lowrank", "dense")] + \
        [(family, "skip", "native") for family in sorted(FAMILIES) if family != "llama"] + \
        [(family, "shared", "lowrank") for family in ("phi3", "qwen3_moe")] + [("mixtral", "shared", "dense")] + \
        [("qwen2", "lowrank+latent", "native"), ("qwen2", "skip+latent16", "lowrank")] + \
        [(family, "lowrank+latent", "native") for family in ("gemma2", "gemma3_text", "olmo2")] + \
        [("qwen3", "skip+latent16", "lowrank"), ("phi3", "lowrank+latent folded", "native")]
# qwen2: k/v biases; gemma2: soft caps, sliding layers; gemma3_text: per-head k_norm, local and global RoPE;
# olmo2: k_norm over the whole projection; qwen3: k_norm in the lowrank form; phi3: k and v out of qkv_proj


def _case_id(case) -> str:
    return "-".join(case).replace(" ", "_").replace("+", "_")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (model, folder, tokens)}, and every folder loaded by one Python without rankfold."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = tiny_tokenizer(512)
    tokens = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    cases = {}
    for case in CASES:
        model_type, structure, form = case
        model = compressed_model(model_type, structure, len(tokenizer))
        folder = root / _case_id(case)
        write_folder(model, tokenizer, folder, form)
        cases[case] = (model, folder)
    jobs = [{"folder": str(folder), "out": str(folder) + ".result.pt"} for _, folder in cases.values()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(LOADER), str(root / "jobs.json"), str(root / "tokens.pt"),
                           str(PROMPT), str(NEW_TOKENS)], capture_output=True, text=True,
                          env={"HF_MODULES_CACHE": str(root / "modules"), "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1"}, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, tokens


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_the_folder_loads_without_rankfold_with_equal_logits_and_tokens(exported, case):
    cases, tokens = exported
    model, folder = cases[case]
    result = torch.load(str(folder) + ".result.pt", weights_only=True)
    assert not result["rankfold_imported"]
    with torch.no_grad():
        logits = model(tokens).logits
        generated = model.generate(tokens[:1, :PROMPT], max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)
    exact = case[2] != "dense"  # the dense form multiplies the factors out (float64, then float32)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-4 if exact else 1e-3, atol=1e-4 if exact else 1e-3)
    assert result["generated"].tolist() == generated.tolist()
    config = json.loads((folder / "config.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's private mode
    if case[2] == "dense":
        assert "auto_map" not in config and not config["model_type"].startswith("rankfold_")
    else:
        assert config["auto_map"]["AutoModel"].startswith("modeling_rankfold.")


def test_forms_say_what_they_cannot_hold(tmp_path):
    model = compressed_model("llama", "lowrank+latent folded", 512)
    for form in ("lowrank", "dense"):
        with pytest.raises(ExportError, match="folded into o_proj.*--form native"):
            write_folder(model, None, tmp_path / form, form)
        assert not (tmp_path / form).exists() and not list(tmp_path.iterdir())  # nothing half-written is left
    phi3 = compressed_model("phi3", "lowrank+latent", 512)
    with pytest.raises(ExportError, match="rows of self_attn.qkv_proj.*--form native"):
        write_folder(phi3, None, tmp_path / "phi3", "lowrank")
    with pytest.raises(ExportError, match="not one of"):
        from rankfold.export.folder import export
        export(tmp_path, tmp_path / "x", form="bf16")
    assert FORMS == ("native", "lowrank", "dense")


def test_the_shipped_code_imports_only_torch_transformers_and_itself():
    files = runtime_sources(["rankfold.modules.layout", "rankfold.modules.latent_kv", "rankfold.modules.shared",
                             "rankfold.modules.sparse", "rankfold.modules.factored", "rankfold.modules.experts"])
    from transformers.dynamic_module_utils import get_imports

    tops = set()
    for name, text in files.items():
        path = Path("/tmp") / f"rankfold-export-check-{name}"
        path.write_text(text)
        tops |= set(get_imports(path))
        path.unlink()
    assert tops <= {"torch", "transformers", "__future__", "dataclasses", "functools", "inspect", "sys", "typing", "weakref", "math", "warnings",
                    "importlib", "os", "collections", "pkgutil"}, tops


@pytest.mark.parametrize("structure,buffer", [("skip", "permutation"), ("sparse", "S_indices")])
def test_a_loader_that_skips_buffers_gets_an_error_not_wrong_tokens(structure, buffer):
    """vLLM's Transformers backend loads parameters only: a native skip or sparse folder there would run
    with buffers left on the meta device; the forward says so and names the form that serves."""
    model = compressed_model("llama", structure, 512)
    owner = next(m for name, m in model.named_modules() if isinstance(getattr(m, buffer, None), torch.Tensor)
                 and getattr(m, "skip", True))
    setattr(owner, buffer, torch.empty_like(getattr(owner, buffer), device="meta"))
    with pytest.raises(RuntimeError, match="never loaded.*--form lowrank"):
        model(torch.tensor([[1, 2, 3]]))
