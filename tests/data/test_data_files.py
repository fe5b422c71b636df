"""An artifact's identity holds every file its data loader reads, and only those: readers reach files only
through a DataFiles recorder, and digests hash what a run of the reader recorded (files.py).

Tiny synthetic copies of each benchmark's published layout (../shared/data/README.md), with files beside
them that the reader must not read. A process-wide audit hook sees every file the process opens, so a
reader that opened a file behind the recorder's back would be caught here."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from rankfold.core.hashing import sha256_file
from rankfold.data.benchmarks import READERS, data_files, read_documents
from rankfold.data.source import TextSource
from rankfold.data.text import CalibrationSample, load_text, text_files, text_fingerprint
from rankfold.data.zeroshot_tasks import ZEROSHOT_TASKS
from rankfold.jobs.spec import parse_any_spec
from rankfold.orchestrator.plan import eval_plan

# ---------------------------------------------------------------- every file the process opens

_OPENED: list[list[str]] = []  # a list per active `opened_under` (the hook is process-wide, so it stays cheap)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED[-1].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextmanager
def opened_under(root: Path):
    """The set of files under `root` opened (by anything in this process) inside the block."""
    seen: set[Path] = set()
    _OPENED.append([])
    try:
        yield seen
    finally:
        prefix = os.path.realpath(root) + os.sep
        seen.update(Path(p) for p in _OPENED.pop() if p.startswith(prefix))


def _real(paths) -> set[Path]:
    return {Path(os.path.realpath(p)) for p in paths}


# ---------------------------------------------------------------- tiny layouts, as published

def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _ai2(k: int, stem_field: str = "stem") -> dict:
    return {"id": f"q{k}", "question": {stem_field: f"Question {k}?", "choices": [
        {"text": f"yes {k}", "label": "A"}, {"text": f"no {k}", "label": "B"}]}, "answerKey": "AB"[k % 2]}


def _piqa(folder: Path) -> tuple[Path, list[Path]]:
    _jsonl(folder / "valid.jsonl", [{"goal": f"goal {k}", "sol1": f"a {k}", "sol2": f"b {k}"} for k in range(3)])
    _lines(folder / "valid-labels.lst", ["0", "1", "1"])
    _jsonl(folder / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}, {"goal": "h", "sol1": "a", "sol2": "b"}])
    _lines(folder / "train-labels.lst", ["0", "1"])
    _lines(folder / "README.md", ["# PIQA", "labels beside"])
    return folder / "valid.jsonl", [folder / "train.jsonl", folder / "train-labels.lst", folder / "README.md"]


def _arc(name: str):
    def layout(folder: Path) -> tuple[Path, list[Path]]:
        _jsonl(folder / f"{name}-Test.jsonl", [_ai2(k) for k in range(3)])
        _jsonl(folder / f"{name}-Dev.jsonl", [_ai2(k) for k in range(5, 7)])
        _lines(folder / f"{name}-Test-labels.lst", ["A", "B"])  # looks like a companion; ARC's reader has none
        return folder / f"{name}-Test.jsonl", [folder / f"{name}-Dev.jsonl", folder / f"{name}-Test-labels.lst"]
    return layout


def _hellaswag(folder: Path) -> tuple[Path, list[Path]]:
    _jsonl(folder / "hellaswag_val.jsonl", [{"ind": k, "ctx": f"Activity {k}: A man stands. he",
                                             "label": k % 4, "endings": ["a", "b", "c", "d"]} for k in range(3)])
    (folder / "hellaswag_val_full.txt.bz2").write_bytes(b"BZh9\x00\x01\x02\n\x03\x04\n")
    return folder / "hellaswag_val.jsonl", [folder / "hellaswag_val_full.txt.bz2"]


def _wino_record(k: int, answer: bool) -> dict:
    record = {"qID": f"w{k}", "sentence": f"Ann beat Bo {k} times so _ won.", "option1": "Ann", "option2": "Bo"}
    return {**record, "answer": "12"[k % 2]} if answer else record


def _winogrande_labels_beside(folder: Path) -> tuple[Path, list[Path]]:
    """The documented layout: dev.jsonl without answers, dev-labels.lst beside it."""
    _jsonl(folder / "dev.jsonl", [_wino_record(k, answer=False) for k in range(3)])
    _lines(folder / "dev-labels.lst", ["1", "2", "2"])
    _jsonl(folder / "train.jsonl", [_wino_record(k, answer=True) for k in range(2)])
    return folder / "dev.jsonl", [folder / "train.jsonl"]


def _winogrande_answers_inside(folder: Path) -> tuple[Path, list[Path]]:
    """Answers in the documents: the label file beside them is not read, so it is not their identity."""
    _jsonl(folder / "dev.jsonl", [_wino_record(k, answer=True) for k in range(3)])
    _lines(folder / "dev-labels.lst", ["2", "1", "1"])
    return folder / "dev.jsonl", [folder / "dev-labels.lst"]


def _boolq(folder: Path) -> tuple[Path, list[Path]]:
    _jsonl(folder / "val.jsonl", [{"question": f"q {k}", "passage": f"p {k}", "idx": k,
                                   "label": ["true", "false"][k % 2]} for k in range(3)])
    _jsonl(folder / "train.jsonl", [{"question": "q", "passage": "p", "label": "true"},
                                    {"question": "r", "passage": "p", "label": "false"}])
    return folder / "val.jsonl", [folder / "train.jsonl"]


def _openbookqa(folder: Path) -> tuple[Path, list[Path]]:
    _jsonl(folder / "test.jsonl", [_ai2(k) for k in range(3)])
    _lines(folder / "test.tsv", ["q0\tQuestion 0?\tA", "q1\tQuestion 1?\tB"])
    return folder / "test.jsonl", [folder / "test.tsv"]


def _xsum(folder: Path) -> tuple[Path, list[Path]]:
    _jsonl(folder / "test_1000.jsonl", [{"document": f"Article {k}.", "summary": f"Summary {k}.", "id": str(k)}
                                        for k in range(3)])
    _jsonl(folder / "train.jsonl", [{"document": "d", "summary": "s", "id": "a"},
                                    {"document": "e", "summary": "t", "id": "b"}])
    return folder / "test_1000.jsonl", [folder / "train.jsonl"]


# (task, layout): every reader at least once; WinoGrande with and without answers in its documents.
LAYOUTS = {
    "piqa": ("piqa", _piqa),
    "arc_easy": ("arc_easy", _arc("ARC-Easy")),
    "arc_challenge": ("arc_challenge", _arc("ARC-Challenge")),
    "hellaswag": ("hellaswag", _hellaswag),
    "winogrande-labels-beside": ("winogrande", _winogrande_labels_beside),
    "winogrande-answers-inside": ("winogrande", _winogrande_answers_inside),
    "boolq": ("boolq", _boolq),
    "openbookqa": ("openbookqa", _openbookqa),
    "xsum": ("xsum", _xsum),
}


def test_every_reader_has_a_layout_here():
    """A new benchmark reader gets a layout above, so the identity tests below cover it too."""
    assert {task for task, _ in LAYOUTS.values()} == set(READERS)


# ---------------------------------------------------------------- the digest a result is stored under

def _evaluate_digest(task: str, path: Path, limit: int | None, out: Path) -> str:
    """The digest of the evaluate stage that reads `task`'s documents from `path` (`rankfold eval`)."""
    if task == "xsum":
        evaluation = {"generation": [{"name": "xsum", "data": str(path), "limit": limit}]}
    else:
        evaluation = {"zeroshot": [{"name": "suite", "tasks": {task: {"path": str(path), "limit": limit}}}]}
    spec = parse_any_spec({"model": {"source": "smollm2-135m"}, "evaluation": evaluation,
                           "output": {"dir": str(out)}})
    (digest,) = eval_plan(spec, "model-fingerprint", "dense").digests().values()
    return digest


def _rewrite_same_size(path: Path) -> None:
    """The file's lines in reverse order, written in place with the same size and times (so only its
    content tells the change)."""
    before = path.stat()
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(set(lines)) >= 2, f"{path}: a layout file needs two different lines to be changed"
    path.write_bytes(b"".join(reversed(lines)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def _documents(task: str, path: Path, limit: int | None):
    try:
        return read_documents(task, path, limit)
    except ValueError as err:
        return repr(err)


@pytest.mark.parametrize("limit", [None, 2])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_identity_is_exactly_the_files_the_reader_opens(layout, limit, tmp_path):
    """For every reader and layout: the files hashed are the files reading the documents opens (seen by
    the audit hook, not by the recorder); changing any of them changes the evaluate stage's digest, and
    changing a file beside them that the reader does not open changes neither documents nor digest."""
    task, make = LAYOUTS[layout]
    folder = tmp_path / "data"
    folder.mkdir()
    path, unread = make(folder)
    with opened_under(folder) as opened:
        read_documents(task, path, limit)
    recorded = data_files(task, path, limit)
    assert _real(recorded) == opened and path in recorded
    assert not opened & _real(unread)

    out = tmp_path / "out"
    digest = _evaluate_digest(task, path, limit, out)
    for changed in recorded:
        documents = _documents(task, path, limit)
        _rewrite_same_size(changed)
        assert _documents(task, path, limit) != documents, f"{changed.name}: the change must matter"
        new_digest = _evaluate_digest(task, path, limit, out)
        assert new_digest != digest, f"{layout}: {changed.name} changed, the digest did not"
        digest = new_digest
    documents = _documents(task, path, limit)
    for other in unread:
        _rewrite_same_size(other)
        assert _documents(task, path, limit) == documents
        assert _evaluate_digest(task, path, limit, out) == digest, f"{other.name} is not read but is hashed"


def test_winogrande_labels_flipped_in_place_are_a_new_result(tmp_path):
    """The issue's case: dev.jsonl without answers, dev-labels.lst beside it; the labels flipped in place
    under the same spec must not reuse the old accuracy."""
    path, _ = _winogrande_labels_beside(tmp_path)
    assert data_files("winogrande", path) == [path, tmp_path / "dev-labels.lst"]
    before = _evaluate_digest("winogrande", path, 2, tmp_path / "out")
    _lines(tmp_path / "dev-labels.lst", ["2", "1", "1"])
    assert [d["answer"] for d in read_documents("winogrande", path, 2)] == ["2", "1"]
    assert _evaluate_digest("winogrande", path, 2, tmp_path / "out") != before


def test_piqa_labels_flipped_in_place_are_a_new_result(tmp_path):
    path, _ = _piqa(tmp_path)
    assert data_files("piqa", path) == [path, tmp_path / "valid-labels.lst"]
    before = _evaluate_digest("piqa", path, None, tmp_path / "out")
    _lines(tmp_path / "valid-labels.lst", ["1", "0", "0"])
    assert _evaluate_digest("piqa", path, None, tmp_path / "out") != before


def test_a_missing_label_file_is_still_named(tmp_path):
    """A load that fails still reports what it looked for (preflight names the missing file)."""
    path, _ = _winogrande_labels_beside(tmp_path)
    (tmp_path / "dev-labels.lst").unlink()
    assert data_files("winogrande", path) == [path, tmp_path / "dev-labels.lst"]
    assert data_files("xsum", tmp_path / "absent.jsonl") == [tmp_path / "absent.jsonl"]
    with pytest.raises(KeyError, match="unknown benchmark task"):
        data_files("nonesuch", path)


def test_every_zeroshot_task_has_a_reader():
    assert set(ZEROSHOT_TASKS) <= set(READERS)


# ---------------------------------------------------------------- text sources (calibration, perplexity)

def _text_layout(folder: Path) -> list[tuple[TextSource, Path]]:
    (folder / "corpus.txt").write_text("First line.\n\nSecond line.\n", encoding="utf-8")
    _jsonl(folder / "corpus.jsonl", [{"text": "first record"}, {"text": "second record"}])
    return [(TextSource(path=folder / "corpus.txt"), folder / "corpus.txt"),
            (TextSource(path=folder / "corpus.txt", lines_as_rows=True), folder / "corpus.txt"),
            (TextSource(path=folder / "corpus.jsonl"), folder / "corpus.jsonl")]


@pytest.mark.parametrize("which", range(3))
def test_text_identity_is_exactly_the_files_load_text_opens(which, tmp_path):
    source, path = _text_layout(tmp_path)[which]
    _lines(tmp_path / "corpus-labels.lst", ["1", "2"])  # beside it, never read
    with opened_under(tmp_path) as opened:
        text = load_text(source)
    assert text_files(source) == [path] and _real([path]) == opened
    fingerprint, sample = text_fingerprint(source), CalibrationSample.of(source, 1, 8, 0)
    assert fingerprint == sha256_file(path)  # a one-file source keeps the identity it always had
    _rewrite_same_size(tmp_path / "corpus-labels.lst")
    assert text_fingerprint(source) == fingerprint
    _rewrite_same_size(path)
    assert load_text(source) != text
    assert text_fingerprint(source) != fingerprint and CalibrationSample.of(source, 1, 8, 0) != sample


def test_a_hub_dataset_is_named_not_loaded():
    source = TextSource(dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="test")
    assert text_files(source) == []
    assert text_fingerprint(source) == "dataset:wikitext:wikitext-2-raw-v1:test"
