"""A compressed layer's layout: which linears became which low-rank modules, with what rank.

The layout is data (JSON in the checkpoint's config), and `apply_layout` turns it into modules on an
empty (meta) model or layer, so a checkpoint's tensors load into exactly the structure they came from.
Paths are relative to the module the layout is applied to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankfold.modules.latent_kv import replace_attention
from rankfold.modules.lowrank import replace_linears
from rankfold.modules.shared import replace_group
from rankfold.modules.sparse import replace_with_sparse


@dataclass(frozen=True)
class CompressedModule:
    """kind 'lowrank': `members` is one linear, y = B A x.
    kind 'shared': one projection at `shared_path` (skip: identity block + A′) feeding every member's B.
    kind 'lowrank_sparse': `members` is one linear, y = B A x + S x, `options["nnz"]` entries of S
    (modules/sparse.py; rank 0: sparse only).
    kind 'latent_kv': the attention at `shared_path` keeps a latent KV cache (Palu, modules/latent_kv.py);
    `members` are its k_proj and v_proj, `rank` the latent numbers per token, `options` the per-group
    ranks and cache settings (LatentKVShape.from_options, replace_attention).
    `group`: the input group the members read (the architecture's name for it, e.g. 'attn_in')."""

    kind: str
    members: tuple[str, ...]
    rank: int
    shared_path: str | None = None
    skip: bool = False
    group: str | None = None
    options: dict | None = field(default=None, hash=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}  # keeps rank 0

    @classmethod
    def from_json(cls, data: dict) -> "CompressedModule":
        return cls(kind=data["kind"], members=tuple(data["members"]), rank=int(data["rank"]),
                   shared_path=data.get("shared_path"), skip=bool(data.get("skip", False)), group=data.get("group"),
                   options=data.get("options"))

    def prefixed(self, prefix: str) -> "CompressedModule":
        return self.relocated(lambda path: prefix + path)

    def relocated(self, move) -> "CompressedModule":
        """The same module with every path passed through `move` (add or strip a layer prefix)."""
        return CompressedModule(self.kind, tuple(move(m) for m in self.members), self.rank,
                                move(self.shared_path) if self.shared_path else None, self.skip, self.group,
                                self.options)


def apply_layout(root: nn.Module, layout: list[CompressedModule], dtype: torch.dtype | None = None) -> None:
    """Replace dense linears under `root` by the (empty) modules the layout describes; a latent-KV
    attention last, as it takes over whatever q_proj and o_proj became."""
    for module in sorted(layout, key=lambda m: m.kind == "latent_kv"):
        if module.kind == "latent_kv":
            replace_attention(root, module.shared_path, module.options, dtype=dtype)
        elif module.kind == "lowrank_sparse":
            replace_with_sparse(root, module.members[0], module.rank, int(module.options["nnz"]), dtype=dtype)
        elif module.kind == "lowrank":
            replace_linears(root, {module.members[0]: module.rank}, dtype=dtype)
        elif module.kind == "shared":
            out_features = {m: root.get_submodule(m).out_features for m in module.members}
            replace_group(root, module.shared_path, out_features, module.rank, module.skip, dtype=dtype)
        else:
            raise ValueError(f"unknown compressed module kind {module.kind!r}")


def member_ranks(layout: list[CompressedModule]) -> dict[str, int]:
    """Rank of every compressed linear (members of a shared projection share its rank); a latent KV
    cache's k/v are not low-rank linears and are left out."""
    return {member: module.rank for module in layout if module.kind != "latent_kv" for member in module.members}
