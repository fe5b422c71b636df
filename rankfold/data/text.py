"""Text for calibration and evaluation: local .txt / .jsonl files, or a dataset by name."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rankfold.core.errors import BadInput
from rankfold.core.options import Strict
from rankfold.core.resources import release_free_heap
from rankfold.data.opened import DataFiles, content_fingerprint, files_read_by
from rankfold.data.source import TextSource


class DataError(BadInput, ValueError):
    """Text that cannot be read or is unfit for its use: names the source and the problem."""


def read_jsonl(files: DataFiles, path: Path, limit: int | None = None,
               error: type[ValueError] = DataError) -> list[tuple[int, dict]]:
    """(line number, record) of the first `limit` non-blank lines of a JSON-lines file, opened through
    `files`; `error` (naming the file and line) for a line that is not a JSON object."""
    records = []
    with files.open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    return records


def _jsonl_rows(files: DataFiles, path: Path, field: str) -> list[str]:
    rows = []
    for number, record in read_jsonl(files, path):
        if field not in record:
            raise DataError(f"{path}:{number}: no field {field!r} (set text_field)")
        rows.append(str(record[field]))
    return rows


def _dataset_rows(source: TextSource) -> list[str]:
    import datasets  # only users with a reachable hub (or a local datasets cache) get here

    try:
        table = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    except Exception as err:  # datasets raises many types (network, missing config, missing split)
        raise DataError(f"cannot load {source.describe()}: {err}") from None
    if source.text_field not in table.column_names:
        raise DataError(f"{source.describe()}: no column {source.text_field!r} (has {table.column_names})")
    return list(table[source.text_field])


def load_text(source: TextSource, files: DataFiles | None = None) -> str:
    """The source's text. A local file is read through `files` (a fresh DataFiles when None), which
    records what was read: `text_files` is this function's own record, the source's identity."""
    if source.dataset is not None:
        return source.row_separator.join(_dataset_rows(source))
    files = DataFiles() if files is None else files
    path = Path(source.path)
    if not files.is_file(path):
        raise DataError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        return source.row_separator.join(_jsonl_rows(files, path, source.text_field))
    text = files.read_text(path)
    return source.row_separator.join(file_rows(text)) if source.lines_as_rows else text


def text_files(source: TextSource) -> list[Path]:
    """The local files `load_text(source)` reads, as a run of it records them (none for a hub dataset,
    which is not loaded here: its identity is its coordinates)."""
    if source.dataset is not None:
        return []
    return files_read_by(lambda files: load_text(source, files))


def file_rows(text: str) -> list[str]:
    """A text file's lines as the rows of a Hugging Face text dataset built from it (WikiText's
    builder, which GPTQ / SVD-LLM perplexities read): each line with its newline, a whitespace-only
    line as the empty row."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


_TOKENIZED: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # the last few texts tokenized in this process
_TOKENIZED_KEPT = 4


def tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole text as one 1-D token tensor (no special tokens: windows are cut from it). Shared,
    read-only: the last few results are kept, since preflight, calibration and Fisher read the same
    text (a 3 MB text takes seconds to tokenize)."""
    key = (hashlib.sha256(text.encode("utf-8")).hexdigest(), type(tokenizer).__name__, tokenizer.name_or_path,
           len(tokenizer), tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else None)
    if key not in _TOKENIZED:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _TOKENIZED[key] = torch.tensor(ids, dtype=torch.long)
        del ids
        release_free_heap()  # the tokenizer's per-token encodings: hundreds of MB a 3 MB text, else kept
        while len(_TOKENIZED) > _TOKENIZED_KEPT:
            _TOKENIZED.popitem(last=False)
    _TOKENIZED.move_to_end(key)
    return _TOKENIZED[key]


def calibration_samples(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """(num_samples, seq_len) distinct windows at seeded random offsets, the GPTQ / SVD-LLM convention
    (offsets drawn uniformly, as `torch.randint(0, len − seq_len)` does there; a repeated offset is
    replaced by further draws, so every sample is a different window). Raises DataError when the text
    holds fewer than `num_samples` distinct windows."""
    possible = tokens.numel() - seq_len + 1
    if possible < num_samples:
        raise DataError(f"calibration text has {tokens.numel()} tokens: {max(possible, 0)} distinct windows of "
                        f"seq_len={seq_len}, fewer than num_samples={num_samples}")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, max(possible - 1, 1), (num_samples,), generator=generator).tolist()
    starts = list(dict.fromkeys(first))  # distinct, in draw order
    while len(starts) < num_samples:  # only after a repeat: top up from every possible offset
        more = torch.randint(0, possible, (num_samples,), generator=generator).tolist()
        seen = set(starts)
        starts += [s for s in dict.fromkeys(more) if s not in seen][:num_samples - len(starts)]
    return torch.stack([tokens[s:s + seq_len] for s in starts])


def text_fingerprint(source: TextSource) -> str:
    """Identity of a text source for artifact keys: the content of the files load_text reads (text_files:
    a single file's sha256, as it always was); a hub dataset's coordinates."""
    if source.path is not None:
        return content_fingerprint(text_files(source))
    return f"dataset:{source.dataset}:{source.dataset_config}:{source.split}"


class CalibrationSample(Strict):
    """Which token windows a calibration pass reads: `num_samples` distinct windows of `seq_len` tokens of
    `data`, drawn with `seed` (calibration_samples); `text` is the data's fingerprint (text_fingerprint),
    so a changed file is a different sample."""

    data: TextSource
    text: str
    num_samples: int
    seq_len: int
    seed: int

    @classmethod
    def of(cls, data: TextSource, num_samples: int, seq_len: int, seed: int) -> "CalibrationSample":
        return cls(data=data, text=text_fingerprint(data), num_samples=num_samples, seq_len=seq_len, seed=seed)

    def ids(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """(num_samples, seq_len) token ids; DataError when the text is too short."""
        return calibration_samples(tokenize(load_text(self.data), tokenizer), self.num_samples, self.seq_len,
                                   self.seed)
