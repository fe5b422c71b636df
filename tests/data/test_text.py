"""Calibration windows: distinct, seeded, and the text too short for them is an error naming both counts."""

from __future__ import annotations

import pytest
import torch

from rankfold.data.text import DataError, calibration_samples


def test_windows_are_distinct_even_when_the_draws_repeat():
    tokens = torch.arange(100)  # 37 distinct windows of 64
    samples = calibration_samples(tokens, 34, 64, seed=0)
    assert len({tuple(row.tolist()) for row in samples}) == 34
    assert calibration_samples(tokens, 37, 64, seed=0).shape == (37, 64)  # every window, once


def test_long_text_keeps_the_conventional_draws():
    """Without a repeat the offsets are exactly torch.randint(0, len − seq_len) (GPTQ / SVD-LLM)."""
    tokens = torch.arange(100_000)
    starts = torch.randint(0, 100_000 - 64, (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(calibration_samples(tokens, 16, 64, seed=3)[:, 0], starts)


def test_text_of_exactly_one_window_is_accepted():
    assert torch.equal(calibration_samples(torch.arange(64), 1, 64, seed=0), torch.arange(64)[None])


def test_too_few_distinct_windows_is_an_error():
    with pytest.raises(DataError, match="37 distinct windows of seq_len=64, fewer than num_samples=38"):
        calibration_samples(torch.arange(100), 38, 64, seed=0)


def test_wikitext_rows_follow_the_dataset_convention(shared_data):
    """lines_as_rows joins the rows the WikiText dataset has — each line with its newline, a blank
    line an empty row — with "\\n\\n", as GPTQ / SVD-LLM join `load_dataset(...)["text"]`."""
    from rankfold.data.source import TextSource
    from rankfold.data.text import file_rows, load_text

    assert file_rows("a\n \nb\n\n") == ["a\n", "", "b\n", ""]
    raw = (shared_data / "wikitext2" / "wiki.test.raw").read_text()
    rows = file_rows(raw)
    assert len(rows) == 4358 and sum(row == "" for row in rows) == 1467  # the test split's rows
    joined = load_text(TextSource(path=shared_data / "wikitext2" / "wiki.test.raw", lines_as_rows=True))
    assert joined == "\n\n".join(rows) and "\n\n \n\n" not in joined
