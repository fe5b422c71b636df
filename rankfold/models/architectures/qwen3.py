"""Qwen3 (dense): Llama's layout with per-head RMSNorms on queries and keys (q_norm, k_norm) between the
projection and RoPE, and optional sliding-window layers (transformers' layer_types)."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.qwen2 import sliding_window

register_architecture(Architecture("qwen3", ("qwen3", "Qwen3"), sliding_window=sliding_window, gguf=True))
