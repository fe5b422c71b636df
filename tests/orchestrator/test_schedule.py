"""Scheduled runs: due entries are submitted once per slot, missed slots made up once, a failing
entry does not block the others; every finished job appends to the history, which prints and plots."""

from __future__ import annotations

import struct
import zlib
from datetime import datetime

import pytest
import yaml

from rankfold.cli import EXIT_BAD_INPUT, main
from rankfold.orchestrator.history import PALETTE
from rankfold.orchestrator.schedule import Registry, run_due
from tests.conftest import tiny_spec_dict


@pytest.fixture
def spec_file(tmp_path, tiny_model_dir):
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_model_dir, tmp_path / "out")))
    return path


def test_due_entries_are_submitted_once_per_slot(tmp_path, spec_file):
    registry = Registry(tmp_path / "schedules.json")
    registry.add(spec_file, "0 2 * * *", None, now=datetime(2026, 11, 24, 1, 0))
    submitted = []
    submit = lambda spec, address: (submitted.append(spec), f"job-{len(submitted)}")[1]  # noqa: E731
    assert run_due(registry, datetime(2026, 11, 24, 1, 59), submit, log=lambda _: None) == []
    assert run_due(registry, datetime(2026, 11, 24, 2, 0, 30), submit, log=lambda _: None) == ["job-1"]
    assert run_due(registry, datetime(2026, 11, 24, 2, 5), submit, log=lambda _: None) == []
    # The scheduler was down for three nights: one make-up run, then back on the daily slot.
    assert run_due(registry, datetime(2026, 11, 27, 9, 0), submit, log=lambda _: None) == ["job-2"]
    (entry,) = registry.entries()
    assert entry.next_run == "2026-11-28T02:00:00" and entry.last_submission == "job-2"
    assert submitted == [str(spec_file.resolve())] * 2


def test_a_failing_entry_does_not_block_the_others(tmp_path, spec_file):
    registry = Registry(tmp_path / "schedules.json")
    registry.add(spec_file, "0 2 * * *", "http://broken", name="broken", now=datetime(2026, 11, 24))
    registry.add(spec_file, "0 2 * * *", None, name="fine", now=datetime(2026, 11, 24))
    lines = []

    def submit(spec, address):
        if address:
            raise ConnectionError("no cluster there")
        return "ok-1"

    assert run_due(registry, datetime(2026, 11, 24, 2, 1), submit, log=lines.append) == ["ok-1"]
    assert any("broken: submission failed: no cluster there" in line for line in lines)
    assert {e.name: e.next_run for e in registry.entries()} == {"broken": "2026-11-25T02:00:00",
                                                                "fine": "2026-11-25T02:00:00"}


def test_schedule_command_validates_cron_and_spec(tmp_path, spec_file, capsys):
    registry = str(tmp_path / "schedules.json")
    assert main(["schedule", str(spec_file), "--cron", "0 25 * * *", "--registry", registry]) == EXIT_BAD_INPUT
    assert "hour field" in capsys.readouterr().err
    assert main(["schedule", str(tmp_path / "none.yaml"), "--cron", "0 2 * * *", "--registry", registry]) == EXIT_BAD_INPUT
    assert main(["schedule", str(spec_file), "--cron", "0 2 * * *", "--registry", registry]) == 0
    assert main(["schedules", "--registry", registry]) == 0
    assert "nightly  '0 2 * * *'" in capsys.readouterr().out


def _png_pixels(path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat_length = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    return width, height, zlib.decompress(data[41:41 + idat_length])


def test_history_prints_every_run_and_plots_it(tmp_path, spec_file, capsys):
    assert main(["run", str(spec_file)]) == 0
    assert main(["run", str(spec_file)]) == 0  # the nightly re-run: inputs unchanged, stages reused
    capsys.readouterr()
    assert main(["history", str(spec_file), "--plot", str(tmp_path / "trend.png")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "wikitext2" in line and not line.startswith("plot")]
    assert len(rows) == 2 and "calibrate,decompose,assemble" in rows[1]
    width, height, raw = _png_pixels(tmp_path / "trend.png")
    assert (width, height) == (640, 360) and len(raw) == height * (1 + 3 * width)
    assert bytes(PALETTE[0]) in raw and bytes(PALETTE[1]) in raw  # both series drawn
