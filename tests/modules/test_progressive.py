"""Progressive low-rank decoding: nested ranks on views, the schedule realised inside `generate`
(batch 1, a left-padded batch, a second call), and the skip layout's refusal."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankfold.methods.plrd import DecodeSchedule, decode_units, step_ranks
from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.progressive import ProgressiveDecoding, rank_modules

ATTN = ("q_proj", "k_proj", "v_proj")


def _layout(ranks: dict[str, int], skip: bool = False) -> list[CompressedModule]:
    out = []
    for i in range(2):
        p = f"model.layers.{i}."
        out.append(CompressedModule("shared", tuple(p + "self_attn." + m for m in ATTN), ranks["attn"],
                                    p + "self_attn.attn_in", skip, "attn_in"))
        out += [CompressedModule("lowrank", (p + m,), ranks[m.split(".")[1]])
                for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return out


def _model(ranks: dict[str, int], skip: bool = False, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    apply_layout(model, _layout(ranks, skip))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".A", ".B", ".A_prime")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        for module in model.modules():
            if hasattr(module, "permutation"):
                module.permutation.copy_(torch.randperm(module.in_features, generator=gen))
    return model


RANKS = {"attn": 12, "o_proj": 10, "gate_proj": 14, "up_proj": 14, "down_proj": 12}


def test_full_active_rank_is_the_stored_model_and_a_prefix_is_a_lower_rank_model():
    model = _model(RANKS)
    ids = torch.randint(0, 64, (2, 7))
    stored = model(ids).logits
    for module in rank_modules(model).values():
        module.set_active_rank(module.rank)
    assert torch.equal(model(ids).logits, stored)
    for module in rank_modules(model).values():
        module.set_active_rank(module.rank // 2)
    truncated = model(ids).logits
    smaller = _model({k: v // 2 for k, v in RANKS.items()}, seed=1)
    state = model.state_dict()
    with torch.no_grad():
        for name, param in smaller.named_parameters():
            source = state[name]
            param.copy_(source[:param.shape[0]] if name.endswith(".A") else source[:, :param.shape[1]]
                        if name.endswith(".B") else source)
    torch.testing.assert_close(truncated, smaller(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(truncated, stored, atol=1e-3)  # the truncation did change something


def _logs(model):
    logs = {}
    for name, module in rank_modules(model).items():
        module.rank_log = logs.setdefault(name, [])
    return logs


@pytest.mark.parametrize("rows", [1, 3])
def test_schedule_follows_the_decode_step_of_the_cache(rows):
    model = _model(RANKS)
    steps = 9
    schedule = DecodeSchedule(shape="linear", floor=0.25)
    planned = step_ranks(schedule, decode_units(model), steps)
    assert planned[0]["model.layers.0.mlp.gate_proj"] == 14 and planned[-1]["model.layers.0.mlp.gate_proj"] == 4
    logs = _logs(model)
    ids = torch.randint(1, 64, (rows, 6))
    mask = torch.ones_like(ids)
    if rows > 1:  # left padding: rows of 6, 4 and 2 real tokens
        for r, pad in enumerate((0, 2, 4)):
            ids[r, :pad], mask[r, :pad] = 0, 0
    with ProgressiveDecoding(model, planned) as plrd:
        for _ in range(2):  # a second call restarts at step 0
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, pad_token_id=0)
            assert out.shape == (rows, 6 + steps)
    assert plrd.steps == list(range(steps)) * 2
    for name, realised in logs.items():
        assert realised == [planned[t][name] for t in range(steps)] * 2
    assert all(m.active_rank is None for m in rank_modules(model).values())  # restored on exit


def test_sampling_runs_the_same_schedule():
    model = _model(RANKS)
    planned = step_ranks(DecodeSchedule(shape="step", floor=0.5, step_at=3), decode_units(model), 6)
    logs = _logs(model)
    torch.manual_seed(0)
    with ProgressiveDecoding(model, planned):
        model.generate(input_ids=torch.randint(1, 64, (2, 4)), max_new_tokens=6, min_new_tokens=6, do_sample=True,
                       top_k=0, pad_token_id=0)
    name = "model.layers.1.mlp.up_proj"
    assert logs[name] == [14, 14, 14, 7, 7, 7]


def test_skip_layout_is_refused_with_the_reason():
    model = _model(RANKS, skip=True)
    with pytest.raises(ValueError, match="no nested ranks"):
        rank_modules(model)
    projection = model.model.layers[0].self_attn.attn_in
    with pytest.raises(ValueError, match="change of basis"):
        projection.set_active_rank(projection.rank - 1)


def test_dense_model_and_bad_ranks_are_errors():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="no low-rank modules"):
        rank_modules(LlamaForCausalLM(config))
    module = rank_modules(_model(RANKS))["model.layers.0.mlp.gate_proj"]
    with pytest.raises(ValueError, match="outside"):
        module.set_active_rank(15)
