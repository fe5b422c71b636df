"""Where a text comes from: a local file (.txt, or .jsonl with a text field) or a dataset by name."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import model_validator

from rankfold.core.options import Strict


class TextSource(Strict):
    """Text from a local file (.txt, or .jsonl with a text field) or a dataset name (needs a reachable hub)."""

    # Where a file lies is not what it holds: digests hash its content (text_fingerprint) beside this.
    unhashed: ClassVar[frozenset[str]] = frozenset({"path"})

    path: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    # A text file's lines are rows (a blank line an empty row, as the dataset's rows are).
    lines_as_rows: bool = False
    # Rows (jsonl records, dataset rows, or a file's lines with lines_as_rows) are joined with this;
    # WikiText-2 perplexity is conventionally measured on the rows joined with "\n\n" (GPTQ, SVD-LLM).
    row_separator: str = "\n\n"

    @model_validator(mode="after")
    def _exactly_one(self) -> "TextSource":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'dataset' (a dataset name)")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"dataset {self.dataset}" + (f"/{self.dataset_config}" if self.dataset_config else "") + f" [{self.split}]"
