"""A planned stage: what graph.py's PlanBuilder makes and a stage kind's run receives."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    name: str                   # unique in the plan, e.g. "decompose", "evaluate perplexity compressed wikitext2"
    kind: str                   # key in STAGE_KINDS (how it runs)
    digest: str
    params: dict = field(default_factory=dict)  # what it reads of the spec (hashed)
    inputs: dict[str, str] = field(default_factory=dict)  # role -> name of the stage it reads
    labels: dict = field(default_factory=dict)  # how reports label it (not hashed)

    def prefix(self, folder: str) -> str:
        """Where its artifacts live in the store, e.g. 'stats/<digest>'."""
        return f"{folder}/{self.digest}"
