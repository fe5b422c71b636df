"""Benchmark documents from local files, converted to the schema of the datasets on the Hugging Face
hub that lm-evaluation-harness's task configs read (so its prompts and preprocessing apply unchanged).

The local layouts are the ones the benchmarks' authors publish (../shared/data/README.md):

| task            | local file                              | conversion to the hub schema                         |
|-----------------|-----------------------------------------|------------------------------------------------------|
| piqa            | valid.jsonl + valid-labels.lst beside it | `label` (int) joined from the label file, line by line |
| arc_easy/_challenge | ARC-*-Test.jsonl (AI2 schema)      | question.stem -> question; choices -> {text, label}; labels "1"-"4" -> "A"-"D" |
| hellaswag       | {ind, ctx, label, endings} (raw ctx)     | ctx split into activity_label, ctx_a, ctx_b (below) |
| winogrande      | dev.jsonl {sentence, option1, option2, answer} | `answer` as the string "1"/"2"; when absent, from dev-labels.lst beside it |
| boolq           | val.jsonl, label "true"/"false"          | label -> 1/0                                          |
| openbookqa      | test.jsonl (AI2 schema)                  | question.stem -> question_stem; choices -> {text, label} |
| xsum            | {document, summary, id}                  | none                                                  |

HellaSwag: the hub's query is `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`; the local
file keeps only the joined `ctx` ("Roof shingle removal: A man is sitting on a roof. he"). The text
before the first ": " is the activity label; ctx_b is the fragment after the last ". " when it starts
in lower case (ActivityNet items: "he", "the lady"), else empty (WikiHow items). Where the hub's ctx_b
held capitals past its first letter, `capitalize()` differs: close to, not identical with, lm-eval.

Errors: `BenchmarkDataError` (a ValueError) naming the file and the line.

Identity: readers reach files only through a `DataFiles` (files.py), so `data_files(task, path, limit)`
— what a digest hashes — is what a run of the reader itself looked for and opened, never a second list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rankfold.data import text
from rankfold.data.opened import DataFiles, files_read_by
from rankfold.data.text import DataError

Document = dict[str, object]


class BenchmarkDataError(DataError):
    """A benchmark file is missing or malformed; the message names the file and line."""


def read_jsonl(files: DataFiles, path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, record) of the first `limit` records of a benchmark's JSON-lines file."""
    if not files.is_file(path):
        raise BenchmarkDataError(f"{path}: no such file")
    return text.read_jsonl(files, path, limit, BenchmarkDataError)


def _field(path: Path, number: int, record: dict, name: str, kind: type | tuple[type, ...] = str) -> object:
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BenchmarkDataError(f"{path}:{number}: missing field {name!r}")
        value = value[part]
    if not isinstance(value, kind):
        raise BenchmarkDataError(f"{path}:{number}: field {name!r} is {type(value).__name__}, expected "
                                 f"{kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)}")
    return value


def _labels_beside(files: DataFiles, path: Path, suffix: str, count: int) -> list[str]:
    """The label file beside a jsonl file (PIQA's valid-labels.lst, WinoGrande's dev-labels.lst)."""
    labels_path = path.with_name(path.stem + suffix)
    if not files.is_file(labels_path):
        raise BenchmarkDataError(f"{path}: its label file {labels_path} is missing")
    labels = [line.strip() for line in files.read_text(labels_path).splitlines()]
    if len(labels) < count:
        raise BenchmarkDataError(f"{labels_path}: {len(labels)} labels for {count} documents")
    return labels


def _piqa(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    records = read_jsonl(files, path, limit)
    labels = _labels_beside(files, path, "-labels.lst", len(records))
    docs = []
    for k, (number, record) in enumerate(records):
        if labels[k] not in ("0", "1"):
            raise BenchmarkDataError(f"{path.with_name(path.stem + '-labels.lst')}:{k + 1}: label {labels[k]!r} "
                                     "is not 0 or 1")
        docs.append({"goal": _field(path, number, record, "goal"), "sol1": _field(path, number, record, "sol1"),
                     "sol2": _field(path, number, record, "sol2"), "label": int(labels[k])})
    return docs


_NUMERIC_LABELS = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def _choices(path: Path, number: int, record: dict, letters: bool) -> tuple[dict, str]:
    choices = _field(path, number, record, "question.choices", list)
    answer = _field(path, number, record, "answerKey").strip()
    labels = [str(_field(path, number, c, "label")) for c in choices]
    if answer not in labels:
        raise BenchmarkDataError(f"{path}:{number}: answerKey {answer!r} is not one of the labels {labels}")
    if letters:  # a few ARC items number their choices "1".."4": the same letters as the rest
        labels, answer = [_NUMERIC_LABELS.get(x, x) for x in labels], _NUMERIC_LABELS.get(answer, answer)
    return {"text": [str(_field(path, number, c, "text")) for c in choices], "label": labels}, answer


def _arc(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    docs = []
    for number, record in read_jsonl(files, path, limit):
        choices, answer = _choices(path, number, record, letters=True)
        docs.append({"id": str(record.get("id", number)), "question": _field(path, number, record, "question.stem"),
                     "choices": choices, "answerKey": answer})
    return docs


def _openbookqa(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    docs = []
    for number, record in read_jsonl(files, path, limit):
        choices, answer = _choices(path, number, record, letters=False)
        docs.append({"id": str(record.get("id", number)),
                     "question_stem": _field(path, number, record, "question.stem"),
                     "choices": choices, "answerKey": answer})
    return docs


def split_hellaswag_context(ctx: str) -> tuple[str, str, str]:
    """Raw 'activity: ctx_a ctx_b' -> (activity_label, ctx_a, ctx_b); see the module docstring."""
    label, _, rest = ctx.partition(": ")
    if not rest:
        return "", ctx, ""
    head, dot, tail = rest.rpartition(". ")
    if dot and tail[:1].islower() and "[" not in tail:
        return label, head + ".", tail
    return label, rest, ""


def _hellaswag(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    docs = []
    for number, record in read_jsonl(files, path, limit):
        endings = _field(path, number, record, "endings", list)
        label = _field(path, number, record, "label", (int, str))
        if str(label) not in {str(k) for k in range(len(endings))}:
            raise BenchmarkDataError(f"{path}:{number}: label {label!r} is not an index of its {len(endings)} endings")
        ctx = _field(path, number, record, "ctx")
        activity, ctx_a, ctx_b = split_hellaswag_context(ctx)
        docs.append({"ind": record.get("ind", number), "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": ctx, "endings": [str(e) for e in endings], "label": str(label)})
    return docs


def _winogrande(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    records = read_jsonl(files, path, limit)
    labels = (None if all("answer" in r for _, r in records)
              else _labels_beside(files, path, "-labels.lst", len(records)))
    docs = []
    for k, (number, record) in enumerate(records):
        answer = str(record["answer"]).strip() if labels is None else labels[k]
        if answer not in ("1", "2"):
            raise BenchmarkDataError(f"{path}:{number}: answer {answer!r} is not '1' or '2'")
        sentence = _field(path, number, record, "sentence")
        if "_" not in sentence:
            raise BenchmarkDataError(f"{path}:{number}: sentence has no '_' blank")
        docs.append({"sentence": sentence, "option1": _field(path, number, record, "option1"),
                     "option2": _field(path, number, record, "option2"), "answer": answer})
    return docs


_BOOL = {"true": 1, "false": 0, "1": 1, "0": 0}


def _boolq(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    docs = []
    for number, record in read_jsonl(files, path, limit):
        label = str(_field(path, number, record, "label", (str, bool, int))).strip().lower()
        if label not in _BOOL:
            raise BenchmarkDataError(f"{path}:{number}: label {record['label']!r} is not true/false")
        docs.append({"question": _field(path, number, record, "question"),
                     "passage": _field(path, number, record, "passage"), "idx": record.get("idx", number),
                     "label": _BOOL[label]})
    return docs


def _xsum(files: DataFiles, path: Path, limit: int | None) -> list[Document]:
    return [{"document": _field(path, number, record, "document"), "summary": _field(path, number, record, "summary"),
             "id": str(record.get("id", number))} for number, record in read_jsonl(files, path, limit)]


# Each reader reaches files only through its DataFiles: what it records is what data_files reports.
READERS: dict[str, Callable[[DataFiles, Path, int | None], list[Document]]] = {
    "piqa": _piqa, "arc_easy": _arc, "arc_challenge": _arc, "hellaswag": _hellaswag, "winogrande": _winogrande,
    "boolq": _boolq, "openbookqa": _openbookqa, "xsum": _xsum,
}


def data_files(task: str, path: str | Path, limit: int | None = None) -> list[Path]:
    """The files `read_documents(task, path, limit)` reads, in reading order, as a run of it records them
    (the documents first; a label file beside them when the reader opens it: PIQA's always, WinoGrande's
    when a document has no answer). KeyError for an unknown task."""
    return files_read_by(lambda files: read_documents(task, path, limit, files))


def read_documents(task: str, path: str | Path, limit: int | None = None,
                   files: DataFiles | None = None) -> list[Document]:
    """The first `limit` documents of `task` (a key of READERS) from a local file, in the hub's schema;
    every file is reached through `files` (a fresh DataFiles when None), which records it.

    Raises BenchmarkDataError (file and line) for a missing or malformed file, KeyError for an unknown task.
    """
    if task not in READERS:
        raise KeyError(f"unknown benchmark task {task!r} (known: {', '.join(READERS)})")
    docs = READERS[task](DataFiles() if files is None else files, Path(path), limit)
    if not docs:
        raise BenchmarkDataError(f"{path}: no documents")
    return docs
