"""Phi-3 / Phi-3.5 / Phi-4-mini: q, k and v fused in one `qkv_proj`, gate and up in one `gate_up_proj`
(each one matrix reading one input: the fused matrix is factorised as a whole, as Cat would stack its
parts), partial RoPE, and a sliding window over the whole model when the config sets one."""

from rankfold.models.architecture import Architecture, LinearGroup, register_architecture
from rankfold.models.architectures.mistral import sliding_window

register_architecture(Architecture(
    "phi3", ("phi3", "Phi3"), sliding_window=sliding_window,
    groups=(LinearGroup("attn_in", ("self_attn.qkv_proj",)), LinearGroup("attn_out", ("self_attn.o_proj",)),
            LinearGroup("mlp_in", ("mlp.gate_up_proj",)), LinearGroup("mlp_out", ("mlp.down_proj",))),
    fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    latent_kv_unsupported="its keys and values are rows of the fused qkv_proj, which the latent cache does not "
                          "split yet"))
