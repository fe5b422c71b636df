"""What a finished stage gives the stages that declared it as an input: typed views of its record
(the small result in the manifest) and of its artifacts in the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankfold.orchestrator.manifest import StageRecord
from rankfold.orchestrator.model_layout import ModelLayout
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.store import ArtifactStore


@dataclass(frozen=True)
class Output:
    stage: Stage
    record: StageRecord
    store: ArtifactStore

    @property
    def result(self) -> dict:
        return self.record.result


class LayerArtifacts(Output):
    """One artifact per layer (and input group, or matrix) under `<folder>/<digest>/`."""

    folder: ClassVar[str] = "artifacts"

    @classmethod
    def key_of(cls, stage: Stage, layer: int, part: str | None = None) -> str:
        """Where `stage` keeps one layer's (and part's) artifact, e.g. stats/<digest>/layer-00003.safetensors."""
        return f"{stage.prefix(cls.folder)}/layer-{layer:05d}" + (f"-{part}" if part else "") + ".safetensors"

    def key(self, layer: int, part: str | None = None) -> str:
        return self.key_of(self.stage, layer, part)

    def read(self, layer: int, part: str | None = None) -> dict[str, torch.Tensor]:
        return self.store.get_tensors(self.key(layer, part))


class Statistics(LayerArtifacts):
    """Calibration statistics of every layer's input groups (Gram, Σ|x|)."""
    folder = "stats"


class FisherSums(LayerArtifacts):
    """Squared-gradient sums of every projection (FLRA's and Palu's Fisher information)."""
    folder = "fisher"


class Spectra(LayerArtifacts):
    """Whitened spectra of every compressed module, per (layer, input group)."""
    folder = "spectra"


class Factors(LayerArtifacts):
    """The method's factors of every compressed module, per (layer, input group)."""
    folder = "factors"


class KVFactors(LayerArtifacts):
    """A KV method's per-layer factors (Palu: full-rank key/value factors and spectra)."""
    folder = "kv_factors"


class RobustPCA(LayerArtifacts):
    """CAP's robust PCA units (and their scores) of every compressed matrix."""
    folder = "rpca"


class Masks(LayerArtifacts):
    """CAP's kept triples and sparse entries of every compressed matrix."""
    folder = "search"


class Ranks(Output):
    """The allocation: the method's modules with their ranks, and the decode order (gains) if any."""

    @property
    def layout(self) -> ModelLayout:
        return ModelLayout.from_json(self.result["layout"])

    @property
    def gains(self) -> str | None:
        """Store key of rank_gains.safetensors (progressive decoding's order), when the allocator gives one."""
        return self.result.get("gains")


class KVRanks(Output):
    """A KV method's ranks of every layer's cache (Palu: of each key and value head group), and its summary."""

    @property
    def ranks(self) -> dict[int, dict[str, list[int]]]:
        return {int(i): r for i, r in self.result["ranks"].items()}

    @property
    def summary(self) -> dict:
        return self.result["summary"]


class Checkpoint(Output):
    """An assembled model: its store prefix (a job places it in its own Env.checkpoint)."""

    folder_name: ClassVar[str] = "checkpoints"  # store folder of compressed checkpoints

    @property
    def prefix(self) -> str:
        return self.stage.prefix(self.folder_name)


class Rows(Output):
    """An evaluation's metric rows."""

    @property
    def rows(self) -> list[dict]:
        return self.result["rows"]
