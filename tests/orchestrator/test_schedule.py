"""Scheduled runs: due entries are submitted once per slot, missed slots made up once, a failing
entry does not block the others; every finished job appends to the history, which prints and plots."""

from __future__ import annotations

import struct
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from rankfold.cli import EXIT_BAD_INPUT, main
from rankfold.orchestrator.history import format_history, plot_history
from rankfold.orchestrator.schedule import ScheduleEntry, ScheduleError, ScheduleRegistry, parse_now, run_due
from tests.conftest import tiny_spec_dict


@pytest.fixture
def spec_file(tmp_path, tiny_model_dir):
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_model_dir, tmp_path / "out")))
    return path


def test_due_entries_are_submitted_once_per_slot(tmp_path, spec_file):
    registry = ScheduleRegistry(tmp_path / "schedules.json")
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
    registry = ScheduleRegistry(tmp_path / "schedules.json")
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


@pytest.fixture
def utc_plus_one(monkeypatch):
    monkeypatch.setenv("TZ", "XXX-1")  # local time is UTC+1
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_now_with_an_offset_is_compared_in_local_time(tmp_path, spec_file, utc_plus_one):
    registry = ScheduleRegistry(tmp_path / "schedules.json")
    registry.add(spec_file, "0 2 * * *", None, now=datetime(2026, 11, 24, 1, 0))  # next: 02:00 local
    submit = lambda spec, address: "job-1"  # noqa: E731
    assert run_due(registry, datetime(2026, 11, 24, 0, 59, tzinfo=timezone.utc), submit, log=lambda _: None) == []
    assert run_due(registry, datetime(2026, 11, 24, 1, 1, tzinfo=timezone.utc), submit, log=lambda _: None) == ["job-1"]
    (entry,) = registry.entries()
    assert entry.last_run == "2026-11-24T02:01:00" and entry.next_run == "2026-11-25T02:00:00"
    tokyo = timezone(timedelta(hours=9))  # any offset: 2026-11-25 11:00+09:00 is 03:00 local
    assert run_due(registry, datetime(2026, 11, 25, 11, 0, tzinfo=tokyo), submit, log=lambda _: None) == ["job-1"]


def test_scheduler_once_takes_an_iso_now_with_an_offset(tmp_path, capsys):
    """The issue's command: a TypeError traceback (naive next_run vs aware --now) before the fix."""
    registry = ScheduleRegistry(tmp_path / "schedules.json")
    registry.save([ScheduleEntry("later", str(tmp_path / "s.yaml"), "0 2 * * *", None, "2027-01-01T02:00:00")])
    for now in ("2026-12-03T07:01:00+00:00", "2026-12-03T07:01:00Z", "2026-12-03T07:01:00-05:00", "2026-12-03T07:01"):
        assert main(["scheduler", "--once", "--now", now, "--registry", str(registry.path)]) == 0
    assert registry.entries()[0].next_run == "2027-01-01T02:00:00"  # not due: nothing submitted, nothing moved


def test_parse_now_names_a_bad_value(utc_plus_one):
    assert parse_now("2026-12-03T07:01:00+00:00") == datetime(2026, 12, 3, 8, 1)
    assert parse_now("2026-12-03T07:01:00") == datetime(2026, 12, 3, 7, 1)  # naive: local time
    with pytest.raises(ScheduleError, match="--now 'tomorrow': not an ISO time"):
        parse_now("tomorrow")


def test_an_address_with_credentials_is_refused_unprinted(tmp_path, spec_file):
    registry = ScheduleRegistry(tmp_path / "schedules.json")
    with pytest.raises(ScheduleError, match="address 'http://\\*\\*\\*@head:8265': credentials") as info:
        registry.add(spec_file, "0 2 * * *", "http://admin:hunter2@head:8265")
    assert "hunter2" not in str(info.value) and not registry.path.exists()


def test_a_damaged_registry_is_named(tmp_path):
    (tmp_path / "schedules.json").write_text("{not json")
    with pytest.raises(ScheduleError, match="schedules.json: not a registry rankfold wrote"):
        ScheduleRegistry(tmp_path / "schedules.json").entries()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_history_prints_every_run_and_plots_it(tmp_path, spec_file, capsys):
    assert main(["run", str(spec_file)]) == 0
    first = capsys.readouterr()
    assert main(["run", str(spec_file)]) == 0  # the nightly re-run: inputs unchanged, stages reused
    again = capsys.readouterr()
    # the CLI logs to stderr, here not a terminal: plain progress lines, then the report; stdout stays clean
    assert "calibrate  elapsed " in first.err and "achieved compression" in first.err and first.out == ""
    assert "calibrate: reusing verified artifacts (" in again.err
    assert main(["-q", "run", str(spec_file)]) == 0  # quiet: neither progress nor report
    assert capsys.readouterr().err == ""
    assert main(["history", str(spec_file), "--plot", str(tmp_path / "trend.png")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "wikitext2" in line and not line.startswith("plot")]
    assert len(rows) == 3 and "calibrate,allocate,decompose,assemble" in rows[1]
    assert f"plot: {tmp_path / 'trend.png'}" in out
    width, height = _png_size(tmp_path / "trend.png")
    assert width >= 400 and height >= 300


def _record(finished_at: float, compressed: float, rows: list[dict] | None = None) -> dict:
    return {"finished_at": finished_at, "total_wall_s": 12.5, "reused_stages": [],
            "perplexity": [{"name": "wikitext2", "window": 128, "tokens": 4096, "dense": 20.0,
                            "compressed": compressed}], **({"rows": rows} if rows is not None else {})}


def test_history_plot_of_two_records_has_series_labels_and_a_legend(tmp_path):
    accuracy = {"evaluator": "zeroshot", "name": "arc_easy", "metric": "accuracy", "shots": 0}
    records = [_record(1_790_000_000.0, 23.5),  # an old record: perplexity rows only
               _record(1_790_086_400.0, 22.9, rows=[{**accuracy, "variant": "dense", "value": 0.61},
                                                   {**accuracy, "variant": "compressed", "value": 0.58}])]
    figure = plot_history(tmp_path / "trend.png", records, title="nightly")
    width, height = _png_size(tmp_path / "trend.png")
    assert width >= 1200 and height >= 400 and (tmp_path / "trend.png").stat().st_size > 10_000  # side by side
    perplexity, accuracy_axes = figure.axes  # one subplot per metric
    assert perplexity.get_title() == "nightly: perplexity" and perplexity.get_ylabel() == "perplexity"
    assert perplexity.get_xlabel() == "finished (UTC)" and accuracy_axes.get_ylabel() == "accuracy"
    assert [t.get_text() for t in perplexity.get_legend().get_texts()] == ["wikitext2 dense", "wikitext2 compressed"]
    assert [t.get_text() for t in accuracy_axes.get_legend().get_texts()] == ["arc_easy dense", "arc_easy compressed"]
    assert [len(line.get_xdata()) for line in perplexity.get_lines()] == [2, 2]
    table = format_history(records)
    assert "arc_easy" in table and "accuracy" in table and "0.580" in table and table.count("wikitext2") == 2
