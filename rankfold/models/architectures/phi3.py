"""Phi-3 / Phi-3.5 / Phi-4-mini: q, k and v fused in one `qkv_proj`, gate and up in one `gate_up_proj`
(each one matrix reading one input: the fused matrix is factorised as a whole, as Cat would stack its
parts), partial RoPE, and a sliding window over the whole model when the config sets one. With Palu, k and v
become latents and the query rows of qkv_proj a q_proj of their own (dense: the weight method may
compress o_proj and the MLP)."""

from rankfold.models.architecture import Architecture, LinearGroup, register_architecture
from rankfold.models.architectures.mistral import sliding_window
from rankfold.modules.latent_kv import head_dim


def fused_rows(config) -> dict[str, tuple[int, ...]]:
    d, kv = head_dim(config), config.num_key_value_heads
    return {"qkv_proj": (config.num_attention_heads * d, kv * d, kv * d),
            "gate_up_proj": (config.intermediate_size, config.intermediate_size)}


register_architecture(Architecture(
    "phi3", ("phi3", "Phi3"), sliding_window=sliding_window,
    groups=(LinearGroup("attn_in", ("self_attn.qkv_proj",)), LinearGroup("attn_out", ("self_attn.o_proj",)),
            LinearGroup("mlp_in", ("mlp.gate_up_proj",)), LinearGroup("mlp_out", ("mlp.down_proj",))),
    fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    fused_rows=fused_rows, gguf=True))
