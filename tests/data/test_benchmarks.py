"""Benchmark files -> the hub's schema: every conversion the local layouts need, and errors that name
the file and line."""

from __future__ import annotations

import pytest

from rankfold.data.benchmarks import BenchmarkDataError, read_documents, split_hellaswag_context


def test_piqa_labels_come_from_the_file_beside(shared_data):
    docs = read_documents("piqa", shared_data / "piqa" / "valid.jsonl", limit=3)
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()[:3]
    assert [d["label"] for d in docs] == [int(x) for x in labels]
    assert docs[0]["goal"].startswith("How do I ready a guinea pig cage")


def test_arc_numeric_labels_become_letters(shared_data):
    docs = read_documents("arc_challenge", shared_data / "arc" / "ARC-Challenge-Test.jsonl", limit=45)
    doc = docs[44]  # NYSEDREGENTS_2008_8_34: choices labelled "1".."4"
    assert doc["id"] == "NYSEDREGENTS_2008_8_34"
    assert doc["choices"]["label"] == ["A", "B", "C", "D"] and doc["answerKey"] in "ABCD"
    assert doc["question"].startswith("Which statement best describes the energy changes")


@pytest.mark.parametrize("ctx, expected", [
    ("Roof shingle removal: A man is sitting on a roof. he", ("Roof shingle removal", "A man is sitting on a roof.", "he")),
    ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady",
     ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady")),
    ("Family Life: How to entertain a toddler. Ask the toddler what he or she would like to do.",
     ("Family Life", "How to entertain a toddler. Ask the toddler what he or she would like to do.", "")),
])
def test_hellaswag_context_split(ctx, expected):
    assert split_hellaswag_context(ctx) == expected


def test_hellaswag_query_is_the_hubs(shared_data):
    """lm-eval's process_docs on the converted document gives the hub document's query (ind 0 on the
    hub: activity_label 'Roof shingle removal', ctx_a 'A man is sitting on a roof.', ctx_b 'he')."""
    from rankfold.data.zeroshot_tasks import zeroshot_task

    task = zeroshot_task("hellaswag", shared_data / "hellaswag" / "hellaswag_val.llamacpp.jsonl", limit=1)
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_target(doc) == 3


def test_boolq_and_winogrande_labels(shared_data):
    boolq = read_documents("boolq", shared_data / "boolq" / "val.jsonl", limit=2)
    assert [d["label"] for d in boolq] == [0, 1]  # "false", "true" in the file
    wino = read_documents("winogrande", shared_data / "winogrande" / "dev.jsonl", limit=3)
    assert [d["answer"] for d in wino] == (shared_data / "winogrande" / "dev-labels.lst").read_text().split()[:3]


def test_openbookqa_stem(shared_data):
    doc = read_documents("openbookqa", shared_data / "openbookqa" / "test.jsonl", limit=1)[0]
    assert doc["question_stem"].startswith("A person wants to start saving money")
    assert doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])] == "quit eating lunch out"


def test_malformed_line_is_named(tmp_path):
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"question": "q", "passage": "p", "label": "true"}\n\n{"question": "q", "passage": \n')
    with pytest.raises(BenchmarkDataError, match=r"val\.jsonl:3: not valid JSON"):
        read_documents("boolq", bad)
    bad.write_text('{"question": "q", "passage": "p", "label": "maybe"}\n')
    with pytest.raises(BenchmarkDataError, match=r"val\.jsonl:1: label 'maybe'"):
        read_documents("boolq", bad)
    bad.write_text('{"question": "q", "label": "true"}\n')
    with pytest.raises(BenchmarkDataError, match=r"val\.jsonl:1: missing field 'passage'"):
        read_documents("boolq", bad)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(BenchmarkDataError, match="no such file"):
        read_documents("xsum", tmp_path / "absent.jsonl")
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(BenchmarkDataError, match="label file .*valid-labels.lst is missing"):
        read_documents("piqa", tmp_path / "valid.jsonl")
