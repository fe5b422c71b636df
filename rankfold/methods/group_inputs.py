"""What a method's factorisation reads of one input group: its calibration statistics, what methods
derive from them (the whitening factor, input norms), and the artifacts of stages the method reads."""

from __future__ import annotations

import torch

from rankfold.methods.statistics import InputStats
from rankfold.methods.whitening import whitening_factor


class GroupInputs:
    """A group's calibration statistics and what methods derive from them, computed at most once."""

    def __init__(self, stats: InputStats | None, artifact=None):
        self.stats = stats
        self._factor: torch.Tensor | None = None
        # artifact(stage kind, member path) -> that stage's tensors for the matrix (Method.reads)
        self._artifact = artifact

    def artifact(self, stage: str, member: str) -> dict[str, torch.Tensor]:
        if self._artifact is None:
            raise ValueError(f"this method reads the {stage!r} stage's artifacts, and none were given")
        return self._artifact(stage, member)

    def _need(self) -> InputStats:
        if self.stats is None:
            raise ValueError("this method needs calibration statistics, and none were collected")
        return self.stats

    @property
    def whitening(self) -> torch.Tensor:
        """Cholesky factor S of the group's Gram (S Sᵀ = Σ x xᵀ), float64."""
        if self._factor is None:
            stats = self._need()
            self._factor = whitening_factor(stats.symmetric_gram())
            # The Gram was consumed in place (symmetrised, maybe shifted) and is not read again: drop
            # it before the SVD (a 70B down_proj's is 6.6 GB) — callers pass stats they do not keep.
            self.stats = InputStats(torch.empty(0, 0, dtype=torch.float64, device=stats.gram.device), stats.abs_sum,
                                    stats.count)
        return self._factor

    @property
    def input_norms(self) -> torch.Tensor:
        """(n,) ‖x_j‖₂ per input channel over the calibration tokens (√ of the Gram's diagonal), float64."""
        return self._need().diagonal().clamp_min(0.0).sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        """(n,) mean |x| per input channel over the calibration tokens, float64."""
        return self._need().mean_abs
