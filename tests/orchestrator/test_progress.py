"""Progress: plain lines logged (no '\\r') when stderr is not a terminal, at most one per interval plus
the last; tqdm's bar on a terminal; nothing while the "rankfold" logger is not enabled for INFO."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from rankfold.execution import progress as progress_module
from rankfold.execution.local import LocalExecutor
from rankfold.execution.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr(monkeypatch) -> io.StringIO:
    """A non-terminal stderr (pytest's own capture may be either), to see nothing is written to it."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_plain_lines_are_logged_when_stderr_is_not_a_terminal(monkeypatch, caplog, stderr):
    caplog.set_level(logging.INFO, logger="rankfold")
    assert list(progress(iter("abc"), "calibrate")) == ["a", "b", "c"]
    assert [record.name for record in caplog.records] == ["rankfold.execution.progress"]  # only the last, so fast
    assert caplog.messages[-1].startswith("(3/3) calibrate  elapsed ") and "\r" not in caplog.text
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    caplog.clear()
    status = iter(["loss 3.0", "loss 2.0", "loss 1.0"])
    assert list(progress(range(3), "decompose", total=3, status=lambda: next(status))) == [0, 1, 2]
    assert [line.split("  ")[0] for line in caplog.messages] == [f"({i}/3) decompose" for i in (1, 2, 3)]
    assert caplog.messages[-1].endswith("ETA 0.0s  loss 1.0")
    assert stderr.getvalue() == ""  # no bar: the lines went through logging only


def test_an_executor_reports_through_logging(caplog, stderr):
    caplog.set_level(logging.INFO, logger="rankfold")
    assert LocalExecutor().map(str, [1, 2], "assemble") == ["1", "2"]
    assert caplog.messages[-1].startswith("(2/2) assemble  elapsed ")


def test_tqdm_bar_when_stderr_is_a_terminal(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="rankfold")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress([1, 2], "assemble", status=lambda: "loss 0.5")) == [1, 2]
    assert "assemble" in terminal.getvalue() and "2/2" in terminal.getvalue() and "loss 0.5" in terminal.getvalue()
    assert not caplog.records


def test_silent_unless_info_is_enabled(monkeypatch, caplog, stderr):
    caplog.set_level(logging.WARNING, logger="rankfold")
    assert list(progress([1, 2], "assemble")) == [1, 2]
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert list(progress([1, 2], "assemble")) == [1, 2]
    assert not caplog.records and sys.stderr.getvalue() == "" and stderr.getvalue() == ""
