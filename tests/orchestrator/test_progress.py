"""Progress: plain lines (no '\\r') on a log, at most one per interval plus the last; tqdm on a terminal."""

from __future__ import annotations

import io

from rankfold.execution import progress as progress_module
from rankfold.execution.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_on_a_log(monkeypatch):
    log = io.StringIO()
    assert list(progress(iter("abc"), "calibrate", stream=log)) == ["a", "b", "c"]
    assert log.getvalue().splitlines()[-1].startswith("(3/3) calibrate  elapsed ")
    assert "\r" not in log.getvalue() and len(log.getvalue().splitlines()) == 1  # only the last, so fast
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    log = io.StringIO()
    assert list(progress(range(3), "decompose", total=3, stream=log)) == [0, 1, 2]
    assert [line.split("  ")[0] for line in log.getvalue().splitlines()] == [f"({i}/3) decompose" for i in (1, 2, 3)]
    assert "ETA 0.0s" in log.getvalue().splitlines()[-1]


def test_tqdm_bar_on_a_terminal_and_silence_without_a_stream():
    terminal = _Terminal()
    assert list(progress([1, 2], "assemble", stream=terminal)) == [1, 2]
    assert "assemble" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert list(progress([1, 2], "assemble", stream=None)) == [1, 2]
