"""Mixtral: Llama's attention, and a mixture of experts in place of the MLP — a top-k router (left
dense) over experts stored per expert on disk (`block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2`
down), fused in transformers 5's module; each expert's matrices are compressed on their own, whitened
with the statistics of the tokens routed to it (gate and up share one input group per expert). A sliding window when the config sets one."""

from rankfold.models.architecture import Architecture, register_architecture
from rankfold.models.architectures.mistral import sliding_window

register_architecture(Architecture(
    "mixtral", ("mixtral", "Mixtral"), sliding_window=sliding_window, experts="mlp.experts",
    num_experts=lambda config: config.num_local_experts,
    stored_names={"block_sparse_moe.experts.{e}.w1": "mlp.experts.{e}.gate_proj",
                  "block_sparse_moe.experts.{e}.w3": "mlp.experts.{e}.up_proj",
                  "block_sparse_moe.experts.{e}.w2": "mlp.experts.{e}.down_proj",
                  "block_sparse_moe.gate": "mlp.gate"}))
