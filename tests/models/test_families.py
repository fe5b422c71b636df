"""Every registered family, on a tiny random config of transformers' own class: rankfold's streamed layers
give transformers' logits (sliding windows included), every structure at full rank reproduces the layer,
calibration Grams equal forward hooks on transformers' model, and a SkipCat + FLRA job (+ Palu where the
family takes a latent cache) runs end to end with its checkpoint's perplexity equal to the streamed one."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

import rankfold
from rankfold.data.text import load_text, tokenize
from rankfold.evaluation.report import metric_table
from rankfold.jobs.spec import parse_spec
from rankfold.methods.group_decomposition import decompose_group
from rankfold.methods.statistics import InputStats
from rankfold.methods.structure import LOWRANK, SHARED, SHARED_SKIP, plan_layer
from rankfold.methods.svd import SvdOptions
from rankfold.models.architecture import ARCHITECTURES
from rankfold.models.sources import SafetensorsSource
from rankfold.orchestrator.job import run_job
from rankfold.orchestrator.preflight import preflight
from rankfold.workers.layer_state import assemble_layer_state
from rankfold.workers.layers import LayerRunner, materialize_layer, runtime_config
from rankfold.workers.shard import LayerStep, SequenceShard, ShardConfig
from rankfold.workers.streamed_perplexity import make_windows, model_perplexity
from tests.conftest import tiny_spec_dict, tiny_tokenizer

# model_type -> (transformers' config class, what makes it that family's kind of layer)
FAMILIES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 24}),  # shorter than the test sequences: the mask matters
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 16}),
    # soft caps low enough to bite; every other layer slides over a window shorter than the sequences
    "gemma2": (Gemma2Config, {"head_dim": 16, "sliding_window": 24, "attn_logit_softcapping": 5.0,
                              "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16}),
    "phi3": (Phi3Config, {"sliding_window": 24, "partial_rotary_factor": 0.5, "pad_token_id": 0}),  # fused qkv, gate_up
    # 4 experts, 2 per token: some get few tokens (below their input width)
    "mixtral": (MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": (Qwen3MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                   "head_dim": 16, "norm_topk_prob": True}),
    "qwen2_moe": (Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                   "shared_expert_intermediate_size": 96}),
    "olmo2": (Olmo2Config, {}),
    # local layers (window 24, their own RoPE base) interleaved with global ones
    "gemma3_text": (Gemma3TextConfig, {"head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 16,
                                       "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": (GraniteConfig, {"embedding_multiplier": 4.0, "logits_scaling": 2.0, "residual_multiplier": 0.5,
                                "attention_multiplier": 0.2}),
}
# every family takes a latent cache: k_norm, soft caps, score scaling, sliding windows, Phi-3's fused qkv
LATENT_KV = set(FAMILIES)


def test_every_family_is_tested_here():
    assert set(FAMILIES) == set(ARCHITECTURES.names())


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, tokenizer):
    """(model_type, folder): a random 2-layer model of the family saved as a safetensors folder."""
    config_class, extra = FAMILIES[request.param]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is near zero; scale so activations are not isotropic noise
        for name, param in model.named_parameters():
            if "embed" not in name:
                param.mul_(4.0) if param.ndim == 2 else param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder


def _tokens(vocab: int, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


def test_streamed_layers_give_transformers_logits(family):
    _, folder = family
    source = SafetensorsSource(folder)
    arch, config = source.architecture, runtime_config(source.config)
    tokens = _tokens(config.vocab_size)
    runner, hidden = LayerRunner(arch, config), arch.embed(tokens, source.embedding(), config, torch.float32)
    for i in range(source.num_layers):
        hidden = runner(materialize_layer(arch, config, i, source.layer_state(i), torch.float32), hidden)
    with torch.no_grad():
        streamed = arch.build_output_head(config, source.final_norm(), source.lm_head())(hidden)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(tokens).logits
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", [LOWRANK, SHARED, SHARED_SKIP], ids=["lowrank", "shared", "skip"])
def test_every_structure_at_full_rank_reproduces_the_layer(family, structure):
    _, folder = family
    source = SafetensorsSource(folder)
    arch, config = source.architecture, runtime_config(source.config)
    dense = source.layer_state(0)
    shapes = {m: tuple(dense[f"{m}.weight"].shape) for g in arch.groups for m in g.members}
    groups = [(g.name, g.members) for g in arch.groups]
    ranks = {}
    for _, members in groups:  # full rank: every member of a shared projection at min(n, Σ rows)
        rows, n = sum(shapes[m][0] for m in members), shapes[members[0]][1]
        ranks.update({m: min(n, rows if structure.share else shapes[m][0]) for m in members})
    modules = plan_layer(structure, groups, shapes, 0.5, ranks)
    fragment = {}
    for name, members in groups:
        mine = [m for m in modules if m.group == name]
        weights = {m: dense[f"{m}.weight"] for m in members}
        fragment.update(decompose_group(SvdOptions(name="svd"), weights, None, mine).tensors)
    state = assemble_layer_state(dense, fragment, modules, torch.float32)
    runner, hidden = LayerRunner(arch, config), torch.randn(2, 40, config.hidden_size)
    compressed = materialize_layer(arch, config, 0, state, torch.float32, modules)
    expected = runner(materialize_layer(arch, config, 0, dense, torch.float32), hidden)
    torch.testing.assert_close(runner(compressed, hidden), expected, rtol=1e-3, atol=1e-3)


def _latent_at_full_rank(model, fold: bool, **cache) -> None:
    """Every layer's attention -> Palu's latent attention with full-rank G-LRD factors (one head a group,
    identity whitening: the exact same K and V through the latent cache), built and filled as a job does
    (kv_layout, layer_kv_tensors, assemble_layer_state); values folded into o_proj or not."""
    from rankfold.methods.palu import PaluOptions, group_factors
    from rankfold.methods.palu_cache import PROJECTIONS, kv_layout, layer_kv_tensors
    from rankfold.modules.latent_kv import head_dim
    from rankfold.modules.layout import apply_layout

    config = model.config
    arch, d, kv = ARCHITECTURES.get(config.model_type).for_config(config), head_dim(config), config.num_key_value_heads
    options = PaluOptions(name="palu", ratio=0.5)
    identity = torch.eye(config.hidden_size, dtype=torch.float64)
    for i, layer in enumerate(model.model.layers):
        dense = {key: value.detach() for key, value in layer.state_dict().items()}
        factors = {}
        for kind, path in PROJECTIONS.items():
            stored, rows = arch.part_rows(path)
            for k, f in enumerate(group_factors(dense[f"{stored}.weight"][rows].double(), identity, d, 1, [d] * kv)):
                factors[f"{kind}.{k}.up"], factors[f"{kind}.{k}.down"] = f.up, f.down
        module = kv_layout(options, () if fold else ("o_proj",), config, {i: {"k": [d] * kv, "v": [d] * kv}})[i]
        module.options.update(cache)
        assert module.options["fold_values"] == fold
        state = assemble_layer_state(dense, layer_kv_tensors(factors, dense, config, module), [module], torch.float32)
        apply_layout(layer, [module], dtype=torch.float32)
        layer.load_state_dict(state, strict=True, assign=True)


def test_latent_attention_at_full_rank_is_the_family_attention(family):
    """Palu's attention with exact factors gives transformers' logits (a pass over 40 tokens, windows of 24
    where the family slides) and its greedy tokens through the latent cache past the window."""
    model_type, folder = family
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    latent = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _latent_at_full_rank(latent, fold=model_type in ("llama", "phi3", "gemma2"))
    tokens = _tokens(dense.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(latent(tokens).logits, dense(tokens).logits, rtol=1e-4, atol=1e-4)
        generated = [m.generate(tokens[:, :12], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                output_logits=True, return_dict_in_generate=True) for m in (dense, latent)]
    torch.testing.assert_close(torch.stack(generated[1].logits), torch.stack(generated[0].logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(generated[0].sequences, generated[1].sequences)
    arch = ARCHITECTURES.get(model_type).for_config(latent.config)
    for i, layer in enumerate(generated[1].past_key_values.layers):  # a sliding layer holds its window only
        window = arch.sliding_window(latent.config, i)
        assert layer.length == 31 and layer.length - layer.dropped == (min(31, window) if window else 31)


def test_calibration_grams_equal_forward_hooks(family):
    _, folder = family
    source = SafetensorsSource(folder)
    tokens = _tokens(source.config.vocab_size)
    shard = SequenceShard(ShardConfig(str(folder), "float32", 1 << 30))
    shard.load(tokens, batch_size=2)
    stats = [shard.advance(i, LayerStep()) for i in range(source.num_layers)]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for group in source.architecture.groups:
            if ".experts." not in group.members[0]:
                hooks.append(layer.get_submodule(group.members[0]).register_forward_pre_hook(
                    lambda _, args, key=(i, group.name): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]))))
        if hasattr(layer.mlp, "experts"):  # transformers' fused experts: each sees the tokens routed to it
            experts = layer.mlp.experts.num_experts
            hooks.append(layer.mlp.experts.register_forward_pre_hook(  # args: tokens, top-k experts, weights
                lambda _, args, i=i, experts=experts: seen.update(
                    {(i, f"mlp_in_{e}"): args[0][(args[1] == e).any(-1)] for e in range(experts)})))
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    assert {key for key in seen} == {(i, g.name) for i in range(source.num_layers)
                                     for g in source.architecture.groups if "mlp_out_" not in g.name}
    for (i, name), x in seen.items():
        x = x.to(torch.float64)
        assert int(stats[i][f"{name}.count"][0]) == x.shape[0]
        torch.testing.assert_close(InputStats.from_tensors(stats[i], name).gram, x.T @ x, rtol=1e-4, atol=1e-3)


def _beside_palu(model_type: str) -> list[str]:
    """What the weight method compresses beside a latent cache: q, o and the MLP (Phi-3's query rows stay
    dense: they are part of its fused qkv_proj)."""
    return ["o_proj", "gate_proj", "up_proj", "down_proj"] if model_type == "phi3" else \
        ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_skipcat_flra_job_runs_end_to_end(family, tmp_path):
    model_type, folder = family
    data = tiny_spec_dict(folder, tmp_path / "out", method="skipcat", ratio=0.3)
    data["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4}
    if model_type in LATENT_KV:
        data["target"]["matrices"] = _beside_palu(model_type)
        data["kv_cache"] = {"name": "palu", "ratio": 0.5, "rank_multiple": 4}
    report = run_job(parse_spec(data))
    row = metric_table(report["rows"])[0]
    ppl = parse_spec(data).evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl.data), _tokenizer(folder)), ppl.window, ppl.max_tokens)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model_perplexity(dense, windows) == pytest.approx(row["dense"], rel=1e-4)
    compressed = rankfold.load(tmp_path / "out" / "model")
    assert model_perplexity(compressed, windows) == pytest.approx(row["compressed"], rel=1e-4)
    assert compressed.config.model_type == f"rankfold_{model_type}"
    assert all(re.search(r"\.mlp_(in|out)_\d+$", group) for group in report["few_calibration_tokens"])  # experts
    experts = [path for path in report["ranks"] if ".experts." in path]
    assert len(experts) == (2 * 3 * 4 if ARCHITECTURES.get(model_type).experts else 0)  # layers × matrices × experts
    assert (report.get("kv_cache") is not None) == (model_type in LATENT_KV)


def test_the_anchored_walk_runs_on_every_family(family, tmp_path):
    """fitting: anchored with a held-out choice of the weight, the output fit and the output correction,
    SkipCat on every dense family: the checkpoint gives the job's perplexity; the correction applies to
    o_proj and down_proj, and down_proj is fitted to the layer output, where the block adds their outputs
    to its residual (not behind a post-norm or a scaled residual: there down_proj is fitted as the other
    groups); a mixture is refused before anything is written."""
    model_type, folder = family
    data = tiny_spec_dict(folder, tmp_path / "out", method="skipcat", ratio=0.3)
    data["fitting"] = {"holdout": 2, "mix": [0.5, 1.0], "attention_correction": True, "output_mix": [0.5, 1.0]}
    spec = parse_spec(data)
    if ARCHITECTURES.get(model_type).experts:
        with pytest.raises(ValueError, match="a mixture's experts see different tokens"):
            preflight(spec)
        assert not (tmp_path / "out").exists()
        return
    report = run_job(spec)
    kept = report["diagnostics"]
    fitted_to_output = sum(kept.get("output_anchored_weights_kept", {}).values())  # down_proj, where linear
    assert sum(kept["anchored_weights_kept"].values()) + fitted_to_output == 2 * 4  # layers × input groups
    dense = AutoModelForCausalLM.from_pretrained(folder)
    post_norm = any(name.endswith("post_feedforward_layernorm") for name, _ in dense.model.layers[0].named_modules())
    scaled = getattr(dense.config, "residual_multiplier", 1.0) != 1.0  # Granite's, in this test's config
    corrected = report["diagnostics"].get("output_correction_weights_kept", {})
    assert sum(corrected.values()) == (0 if post_norm or scaled else 2 * 2)  # layers × (o_proj, down_proj)
    assert fitted_to_output == (0 if post_norm or scaled else 2)
    ppl = spec.evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl.data), _tokenizer(folder)), ppl.window, ppl.max_tokens)
    compressed = rankfold.load(tmp_path / "out" / "model")
    assert model_perplexity(compressed, windows) == pytest.approx(metric_table(report["rows"])[0]["compressed"], rel=1e-4)


def test_palu_beside_a_compressed_fused_qkv_proj_is_a_spec_error(tmp_path):
    """Phi-3's k and v are rows of qkv_proj: a latent cache and a weight method cannot both have them."""
    data = tiny_spec_dict(tmp_path / "phi3", tmp_path / "out", method="svd_llm")
    data["target"]["matrices"] = ["qkv_proj", "o_proj"]
    data["kv_cache"] = {"name": "palu", "ratio": 0.5}
    with pytest.raises(ValueError, match=r"leave qkv_proj out of target.matrices \(e.g. matrices: \[o_proj\]\)"):
        parse_spec(data)


def test_a_projection_the_family_lacks_is_a_spec_error(family, tmp_path):
    model_type, folder = family
    data = tiny_spec_dict(folder, tmp_path / "out")
    fused = ARCHITECTURES.get(model_type).fused
    data["target"]["matrices"] = ["q_proj", "o_proj"] if fused else ["qkv_proj"]
    expected = "fuses q_proj, k_proj, v_proj into qkv_proj" if fused else "no projection named 'qkv_proj'"
    with pytest.raises(ValueError, match=expected):
        preflight(parse_spec(data))


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_groups_with_fewer_tokens_than_inputs_are_named():
    from rankfold.workers.reduce import few_tokens

    tensors = {**InputStats.zeros(8).to_tensors("mlp_in_0"), **InputStats.zeros(4).to_tensors("attn_in")}
    tensors["mlp_in_0.count"][0], tensors["attn_in.count"][0] = 5, 4
    assert few_tokens(3, tensors) == {"3.mlp_in_0": 5}


# Every weight method on every family (the docs' model matrix: docs/generate.py reads these two lists).
MATRIX_METHODS = ("svd", "asvd", "svd_llm", "cat", "skip", "skipcat", "wanda", "cap")


def test_the_matrix_covers_every_method():
    from rankfold.methods.registry import METHODS

    assert set(MATRIX_METHODS) == set(METHODS.names())


@pytest.mark.slow
@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_every_method_runs_on_every_family(family, method, tmp_path):
    """The job's checkpoint loads with rankfold.load and gives the streamed evaluation's perplexity."""
    _, folder = family
    data = tiny_spec_dict(folder, tmp_path / "out", method=method, ratio=0.3)
    data["calibration"].update({"num_samples": 4, "seq_len": 32})
    data["evaluation"]["perplexity"][0].update({"max_tokens": 256})
    if method == "cap":
        data["target"]["allocation"] = {"kind": "search", "samples": 2, "holdout": 2, "batch_size": 2, "steps": 2,
                                        "sparse_block": 8, "fisher_samples": 2}
    report = run_job(parse_spec(data))
    row = metric_table(report["rows"])[0]
    ppl = parse_spec(data).evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl.data), _tokenizer(folder)), ppl.window, ppl.max_tokens)
    compressed = rankfold.load(tmp_path / "out" / "model")
    assert model_perplexity(compressed, windows) == pytest.approx(row["compressed"], rel=1e-4)


@pytest.mark.slow
def test_generate_runs_with_progressive_decoding_and_a_latent_cache(family, tmp_path):
    """transformers' generate on the loaded checkpoint: FLRA's progressive ranks (PLRD) on every family,
    the latent KV cache (Palu) where the family takes one."""
    from rankfold.modules.progressive import ProgressiveDecoding, rank_modules

    model_type, folder = family
    data = tiny_spec_dict(folder, tmp_path / "out", method="svd_llm", ratio=0.3)
    data["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4}
    data["evaluation"]["perplexity"] = []
    if model_type in LATENT_KV:
        data["target"]["matrices"] = _beside_palu(model_type)
        data["kv_cache"] = {"name": "palu", "ratio": 0.5, "rank_multiple": 4}
    run_job(parse_spec(data))
    model = rankfold.load(tmp_path / "out" / "model")
    halves = {path: max(1, module.rank // 2) for path, module in rank_modules(model).items()}
    prompt = _tokens(model.config.vocab_size, 12)[:1]
    with ProgressiveDecoding(model, [{}, halves]) as progressive:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16) and max(progressive.steps) >= 1


@pytest.mark.slow  # ~100 s each on 2 busy cores: the Fisher pass's many small Ray round trips
def test_a_qwen2_and_a_mixtral_job_on_ray_match_in_process(family, tmp_path, ray_executor):
    """SkipCat + FLRA + Palu on the test Ray cluster (2 workers) gives the in-process job's numbers."""
    from rankfold.execution.local import LocalExecutor

    model_type, folder = family
    if model_type not in ("qwen2", "mixtral"):
        pytest.skip("one dense and one mixture-of-experts family on Ray")
    data = tiny_spec_dict(folder, tmp_path / "ray", method="skipcat", ratio=0.3)
    data["target"].update({"allocation": {"kind": "flra", "fisher_samples": 4},
                           "matrices": ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    data["kv_cache"] = {"name": "palu", "ratio": 0.5, "rank_multiple": 4}
    on_ray = run_job(parse_spec(data), executor=ray_executor)
    data["output"] = {"dir": str(tmp_path / "local")}
    local = run_job(parse_spec(data), executor=LocalExecutor(workers=2))
    assert on_ray["executor"].startswith("ray (") and on_ray["ranks"] == local["ranks"]
    assert on_ray["kv_cache"]["kept_dims"] == local["kv_cache"]["kept_dims"]
    for ray_row, local_row in zip(metric_table(on_ray["rows"]), metric_table(local["rows"])):
        assert ray_row["compressed"] == pytest.approx(local_row["compressed"], rel=1e-5)


def test_experts_no_token_reaches_get_their_minimum_rank(family, tmp_path):
    """A router with all-zero weights ties every expert, so top-2 always picks the same two: the other
    experts see no calibration token (zero Gram: identity whitening; zero Fisher: FLRA weight 0). The
    job still runs, the report names them, and the checkpoint gives the streamed perplexity."""
    model_type, folder = family
    if not ARCHITECTURES.get(model_type).experts:
        pytest.skip("a mixture of experts only")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    rigged = tmp_path / "rigged"
    model.save_pretrained(rigged)
    _tokenizer(folder).save_pretrained(rigged)
    data = tiny_spec_dict(rigged, tmp_path / "out", method="skipcat", ratio=0.3)
    data["target"]["allocation"] = {"kind": "flra", "fisher_samples": 4}
    report = run_job(parse_spec(data))
    unreached = {group for group, count in report["few_calibration_tokens"].items() if count == 0}
    assert len(unreached) == 2 * 2 * 2  # layers × two experts × (gate/up, down)
    ppl = parse_spec(data).evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl.data), _tokenizer(folder)), ppl.window, ppl.max_tokens)
    compressed = rankfold.load(tmp_path / "out" / "model")
    assert model_perplexity(compressed, windows) == pytest.approx(metric_table(report["rows"])[0]["compressed"],
                                                                  rel=1e-4)


def test_the_dense_model_loads_whole(family):
    """model_from_source (zero-shot and generation on the original model) reads every family's folder as
    transformers wrote it — a mixture's experts as stored on disk — and gives transformers' logits."""
    from rankfold.checkpoint import model_from_source

    model_type, folder = family
    tokens = _tokens(1000)
    with torch.no_grad():
        ours = model_from_source(SafetensorsSource(folder))(tokens).logits
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_experts_sharing_one_projection_run_end_to_end(family, tmp_path):
    """target.experts: shared — SkipCat + FLRA with one projection A across every expert's gate/up of a
    layer (whitened with the union Gram, a B per expert): the checkpoint gives the streamed perplexity. The
    union statistic is top-k × the Gram of the tokens entering the mixture (every token routed to k experts)."""
    from rankfold.methods.statistics import InputStats
    from rankfold.models.architecture import EXPERTS_UNION

    model_type, folder = family
    arch = ARCHITECTURES.get(model_type)
    data = tiny_spec_dict(folder, tmp_path / "out", method="skipcat", ratio=0.3)
    data["target"].update({"allocation": {"kind": "flra", "fisher_samples": 4}, "experts": "shared"})
    if not arch.experts:
        with pytest.raises(ValueError, match=f"target.experts: {model_type} has no mixture of experts"):
            preflight(parse_spec(data))
        return
    report = run_job(parse_spec(data))
    shared = [m for m in rankfold.load(tmp_path / "out" / "model").config.rankfold["layout"]
              if m.get("group") == EXPERTS_UNION]
    experts = arch.num_experts(SafetensorsSource(folder).config)
    assert len(shared) == 2 and all(len(m["members"]) == 2 * experts
                                    and m["shared_path"].endswith(f"mlp.experts.{EXPERTS_UNION}") for m in shared)
    ppl = parse_spec(data).evaluation.perplexity[0]
    windows = make_windows(tokenize(load_text(ppl.data), _tokenizer(folder)), ppl.window, ppl.max_tokens)
    loaded = rankfold.load(tmp_path / "out" / "model")
    assert model_perplexity(loaded, windows) == pytest.approx(metric_table(report["rows"])[0]["compressed"], rel=1e-4)
    projection = loaded.get_submodule(shared[0]["shared_path"])
    assert not projection.joint  # each expert applies its own B to z; none computes another's outputs

    source = SafetensorsSource(folder)
    shard = SequenceShard(ShardConfig(str(folder), "float32", 1 << 30))
    shard.load(_tokens(source.config.vocab_size), batch_size=2)
    union = InputStats.from_tensors(shard.advance(0, LayerStep()), EXPERTS_UNION)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(_tokens(source.config.vocab_size))
    hook.remove()
    x = seen[0].reshape(-1, source.config.hidden_size).double()
    top_k = source.config.num_experts_per_tok
    assert union.count == top_k * x.shape[0]
    torch.testing.assert_close(union.symmetric_gram(), top_k * x.T @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "gemma3_text"])
def test_latent_attention_with_one_kv_head(model_type, tokenizer):
    """Multi-query attention (one KV head, as Gemma-3-270M): the latent attention at full rank is the
    family's own — a whole-projection k_norm (OLMo 2) and a per-head one coincide at one head."""
    config_class, extra = FAMILIES[model_type]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in dense.parameters():
            param.mul_(4.0) if param.ndim == 2 else param.add_(0.1 * torch.randn_like(param))
    latent = copy.deepcopy(dense)
    _latent_at_full_rank(latent, fold=False)
    tokens = _tokens(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(latent(tokens).logits, dense(tokens).logits, rtol=1e-4, atol=1e-4)
        greedy = [m.generate(tokens[:, :12], max_new_tokens=16, min_new_tokens=16, do_sample=False) for m in (dense, latent)]
    assert torch.equal(*greedy)


def test_a_quantised_sliding_latent_cache_drops_only_what_the_window_hides(tokenizer):
    """Mistral with a window of 24 and 4-bit latents (residual 3): greedy decoding past the window gives
    the same logits whether the cache drops the tokens older than the window or keeps them masked."""
    config_class, extra = FAMILIES["mistral"]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    dropping, keeping = copy.deepcopy(dense), copy.deepcopy(dense)
    _latent_at_full_rank(dropping, fold=False, bits=4, group=8, residual=3)
    _latent_at_full_rank(keeping, fold=False, bits=4, group=8, residual=3, window=None)
    prompt = _tokens(config.vocab_size)[:, :16]
    with torch.no_grad():
        runs = [m.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                           return_dict_in_generate=True) for m in (dropping, keeping)]
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), rtol=1e-5, atol=1e-5)
    held = [layer.length - layer.dropped for layer in runs[0].past_key_values.layers]
    assert held == [24, 24] and all(layer.dropped == 0 for layer in runs[1].past_key_values.layers)
