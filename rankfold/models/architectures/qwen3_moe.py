"""Qwen3-MoE: Qwen3's attention (q_norm, k_norm) and a mixture of experts in every layer (Mixtral's fused
expert layout; see mixtral.py; on disk one gate_proj/up_proj/down_proj per expert). With
`use_sliding_window`, every layer slides (its config has no layer_types). Models with dense MLP layers among the sparse ones (`mlp_only_layers`,
`decoder_sparse_step` > 1) are refused: their layers differ in structure."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.mistral import sliding_window


def num_experts(config) -> int:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError("qwen3_moe with dense MLP layers (mlp_only_layers / decoder_sparse_step) is not supported: "
                         "rankfold assumes one structure for every layer")
    return config.num_experts


register_architecture(Architecture(
    "qwen3_moe", ("qwen3_moe", "Qwen3Moe"), sliding_window=sliding_window, experts="mlp.experts",
    num_experts=num_experts, gguf=True))
