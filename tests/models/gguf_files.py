"""Tiny GGUF files written the way llama.cpp's converter (convert_hf_to_gguf.py) writes a family: tensor
names through gguf's own map, q/k rows permuted for llama's RoPE layout, Gemma's norms stored as 1 + w,
a mixture's experts stacked per projection (ffn_{gate,up,down}_exps), Qwen2-MoE's shared-expert gate
as a vector, float32 data, and the byte-level
BPE tokenizer as a `gpt2` vocabulary with its merges — so rankfold's reader is checked against the
converter's conventions, not against itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerFast

# rankfold's model_type -> gguf's architecture name (llama.cpp calls gemma3_text gemma3, and so on)
GGUF_ARCH = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
NORM_SHIFT = {"gemma2", "gemma3_text"}  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
EXPERTS = re.compile(r"^(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _tensors(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, np.ndarray]:
    """HF tensors as the converter hands them to the name map: converted, experts stacked."""
    out = {}
    for key, value in state.items():
        array = value.float().numpy()
        match = EXPERTS.match(key.removesuffix(".weight"))
        if match and match["proj"] == "gate_up_proj":  # (E, 2·ffn, hidden): gate rows, then up rows
            gate, up = np.split(array, 2, axis=1)
            out[f"{match['layer']}.mlp.experts.gate_proj.weight"] = gate
            out[f"{match['layer']}.mlp.experts.up_proj.weight"] = up
            continue
        if match:  # (E, hidden, ffn)
            out[f"{match['layer']}.mlp.experts.down_proj.weight"] = array
            continue
        if config.model_type == "llama" and key.endswith("self_attn.q_proj.weight"):
            array = _permute(array, config.num_attention_heads)
        elif config.model_type == "llama" and key.endswith("self_attn.k_proj.weight"):
            array = _permute(array, config.num_key_value_heads)
        elif config.model_type in NORM_SHIFT and key.endswith("norm.weight"):
            array = array + 1
        elif key.endswith("shared_expert_gate.weight"):  # Qwen2-MoE's (1, hidden) gate is stored as (hidden,)
            array = array.reshape(-1)
        out[key] = array
    return out


def write_gguf(path: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> Path:
    """`model` (a transformers causal LM, float32) and `tokenizer` as one GGUF file at `path`."""
    config = model.config
    arch = GGUF_ARCH.get(config.model_type, config.model_type)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, config)
    _tokenizer(writer, tokenizer)
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    for key, array in _tensors(state, config).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"gguf has no name for {key}")
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1)))
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope["full_attention"]["rope_theta"] if "full_attention" in rope
                                    else rope["rope_theta"]))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            writer.add_float32(f"{writer.arch}.{name}", float(getattr(config, name)))


def _tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    """The byte-level BPE as llama.cpp writes a gpt2-style vocabulary: tokens in id order, types, merges."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
