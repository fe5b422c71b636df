"""Calibration statistics of one input group: the Gram matrix Σ x xᵀ, Σ|x| and the token count.

They are sums, so shards (and chunks) reduce by addition; float64 whatever the model's dtype. While
they are summed, moved and stored the Gram is packed (its upper block triangle, `packed_gram`: half the
bytes); readers get the full matrix from `gram`, unpacked once.
"""

from __future__ import annotations

from typing import Callable

import torch

from rankfold.methods import packed_gram
from rankfold.methods.whitening import mirror_upper_
from rankfold.models.architecture import EXPERT_INPUT, EXPERTS_UNION


class InputStats:
    """Σ x xᵀ ((n, n) float64, or packed: `upper`), Σ|x| ((n,) float64) and the tokens seen (`count`)."""

    def __init__(self, gram: torch.Tensor | None, abs_sum: torch.Tensor, count: int, *,
                 upper: torch.Tensor | None = None):
        if (gram is None) == (upper is None):
            raise ValueError("InputStats takes exactly one of the full Gram and its packed upper triangle")
        self._gram, self.upper, self.abs_sum, self.count = gram, upper, abs_sum, count

    @classmethod
    def zeros(cls, n: int, device: torch.device | None = None) -> "InputStats":
        """Zero sums of an n-wide input, the Gram packed (what calibration accumulates)."""
        return cls(None, torch.zeros(n, dtype=torch.float64, device=device), 0, upper=packed_gram.zeros(n, device))

    @property
    def width(self) -> int:
        return self.abs_sum.shape[0]

    @property
    def gram(self) -> torch.Tensor:
        """The full (n, n) Gram; a packed one is unpacked here once (exactly symmetric) and the packed
        buffer dropped."""
        if self._gram is None:
            self._gram, self.upper = packed_gram.unpack(self.upper, self.width), None
        return self._gram

    def add_(self, x: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> None:
        """Add one chunk of inputs (..., n). The chunk's product may run in float32 (2x faster on CPU;
        measured 3e-8 relative difference on SmolLM2); the running sums are always float64. Only the
        upper block triangle of x xᵀ is computed (a blocked SYRK), into the packed Gram."""
        if self.upper is None:
            raise ValueError("add_ accumulates into a packed Gram (InputStats.zeros)")
        x = x.reshape(-1, x.shape[-1]).to(product_dtype)  # (tokens, n)
        packed_gram.add_products_(self.upper, x)
        self.abs_sum.add_(x.abs().sum(0))  # the chunk's sum in the product dtype (float64 casts cost 9x)
        self.count += x.shape[0]

    def to(self, device: torch.device) -> "InputStats":
        """These statistics on `device`: themselves when already there (so unpacking the result drops the
        packed buffer), else a copy."""
        if self.abs_sum.device == torch.device(device):
            return self
        if self.upper is not None:
            return InputStats(None, self.abs_sum.to(device), self.count, upper=self.upper.to(device))
        return InputStats(self._gram.to(device), self.abs_sum.to(device), self.count)

    def symmetric_gram(self) -> torch.Tensor:
        """The full Gram, exactly symmetric (a full one completed from its upper triangle in place)."""
        return self.gram if self._gram is None else mirror_upper_(self._gram)

    def diagonal(self) -> torch.Tensor:
        """(n,) the Gram's diagonal (Σ x_j²), without unpacking a packed Gram."""
        return packed_gram.diagonal(self.upper, self.width) if self.upper is not None else self._gram.diagonal()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """{prefix.gram_upper (packed) or prefix.gram (full), prefix.abs_sum, prefix.count}."""
        gram = {f"{prefix}.gram_upper": self.upper} if self.upper is not None else \
            {f"{prefix}.gram": self.symmetric_gram()}
        return {**gram, f"{prefix}.abs_sum": self.abs_sum,
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "InputStats":
        """The statistics stored under `prefix` (a packed Gram stays packed until `gram` is read); for the
        union of a mixture's experts (a prefix with no statistics of its own: EXPERTS_UNION), the sum over
        every `mlp_in_<e>` — each token counted once per expert it was routed to, i.e. top-k × the union's,
        which whitening does not see."""
        if f"{prefix}.abs_sum" not in tensors and prefix == EXPERTS_UNION:
            parts = sorted({key.removesuffix(".abs_sum") for key in tensors
                            if key.endswith(".abs_sum") and EXPERT_INPUT.fullmatch(key.removesuffix(".abs_sum"))})
            if parts:
                return cls.sum([cls.from_tensors(tensors, part) for part in parts])
        abs_sum, count = tensors[f"{prefix}.abs_sum"], int(tensors[f"{prefix}.count"][0])
        if f"{prefix}.gram_upper" in tensors:
            return cls(None, abs_sum, count, upper=tensors[f"{prefix}.gram_upper"])
        return cls(tensors[f"{prefix}.gram"], abs_sum, count)

    @staticmethod
    def names_of(prefix: str) -> Callable[[str], bool]:
        """Whether a stored tensor's name belongs to `prefix`'s statistics (for reading only those of one
        group from a layer's artifact; EXPERTS_UNION reads every expert's)."""
        def wanted(name: str) -> bool:
            group = name.rsplit(".", 1)[0]
            return group == prefix or (prefix == EXPERTS_UNION and EXPERT_INPUT.fullmatch(group) is not None)
        return wanted

    @classmethod
    def sum(cls, parts: list["InputStats"]) -> "InputStats":
        """The parts added in order (packed when every part is packed; otherwise each packed part is
        unpacked, in place, first)."""
        abs_sum, count = sum(p.abs_sum for p in parts), sum(p.count for p in parts)
        if all(p.upper is not None for p in parts):
            return cls(None, abs_sum, count, upper=sum(p.upper for p in parts))
        return cls(sum(p.gram for p in parts), abs_sum, count)
