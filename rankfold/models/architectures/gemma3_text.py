"""Gemma 3 (text; model_type gemma3_text, e.g. gemma-3-1b): Gemma 2's sandwich norms, √hidden embedding
scale and (1 + w) RMSNorms, with per-head q_norm / k_norm, SDPA attention (no soft cap), and local
sliding-window layers interleaved with global ones — each kind with its own RoPE table (the rotary
embedding is called with the layer's type)."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.qwen2 import sliding_window


def layer_type(config, index: int) -> str:
    return config.layer_types[index]


register_architecture(Architecture(
    "gemma3_text", ("gemma3", "Gemma3"), sliding_window=sliding_window, rope_kind=layer_type,
    embed_scale=lambda config: config.hidden_size ** 0.5,
    logit_softcap=lambda config: getattr(config, "final_logit_softcapping", None), gguf=True,
    attention_residual="pre_feedforward_layernorm"))
