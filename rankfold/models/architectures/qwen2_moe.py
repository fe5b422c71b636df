"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) and a mixture of experts
(Mixtral's fused expert layout, see mixtral.py) beside a shared expert every token runs — a dense MLP
(`mlp.shared_expert`, gated by `mlp.shared_expert_gate`, left dense) compressed like Llama's."""

from rankfold.models.architecture import LLAMA_GROUPS, Architecture, LinearGroup, register_architecture
from rankfold.models.architectures.qwen2 import sliding_window
from rankfold.models.architectures.qwen3_moe import num_experts

register_architecture(Architecture(
    "qwen2_moe", ("qwen2_moe", "Qwen2Moe"), sliding_window=sliding_window, kv_bias=lambda config: True,
    groups=(*LLAMA_GROUPS[:2],
            LinearGroup("shared_in", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
            LinearGroup("shared_out", ("mlp.shared_expert.down_proj",))),
    experts="mlp.experts", num_experts=num_experts, gguf=True))
