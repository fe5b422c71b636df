"""Base of every option model in a job spec: strict (a typo is an error) and immutable."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that say how or where something runs, or label it, never what it computes: left out of
    # every digest (e.g. calibration.max_resident_mb, an evaluation entry's name).
    unhashed: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict:
        """What this model contributes to a digest: its JSON without `unhashed` fields and unset optional
        ones (so adding an optional field keeps every stored result of the entries that leave it unset)."""
        return self.model_dump(mode="json", exclude=set(self.unhashed), exclude_none=True)
