"""Qwen3 (dense): Llama's layout with per-head RMSNorms on queries and keys (q_norm, k_norm) between the
projection and RoPE, and optional sliding-window layers (transformers' layer_types)."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.qwen2 import sliding_window

KNORM = ("its k_norm normalises each head's full key before RoPE; a latent cache would have to rebuild every "
         "key to normalise it, which rankfold's latent attention does not do yet")

register_architecture(Architecture("qwen3", ("qwen3", "Qwen3"), sliding_window=sliding_window,
                                   latent_kv_unsupported=KNORM))
