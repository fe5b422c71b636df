"""Gemma 2: Llama's linear groups inside sandwich norms (pre/post attention, pre/post feed-forward;
transformers' layer runs them), embeddings scaled by √hidden, RMSNorms that scale by (1 + w), attention
logits soft-capped (eager attention: SDPA has no soft cap) and scaled by `query_pre_attn_scalar`,
sliding-window layers alternating with global ones (layer_types), final logits soft-capped, tied head."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.qwen2 import sliding_window

register_architecture(Architecture(
    "gemma2", ("gemma2", "Gemma2"), sliding_window=sliding_window, attention="eager",
    embed_scale=lambda config: config.hidden_size ** 0.5,
    logit_softcap=lambda config: getattr(config, "final_logit_softcapping", None), gguf=True,
    attention_residual="pre_feedforward_layernorm"))
