from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from rankfold.orchestrator.cron import CronError, local_time, parse_cron


@pytest.fixture
def utc_plus_one(monkeypatch):
    """This process's local time zone is UTC+1 (a POSIX TZ string: no zone database needed)."""
    monkeypatch.setenv("TZ", "XXX-1")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_daily_at_two():
    cron = parse_cron("0 2 * * *")
    assert cron.next_after(datetime(2026, 11, 24, 1, 0)) == datetime(2026, 11, 24, 2, 0)
    assert cron.next_after(datetime(2026, 11, 24, 2, 0)) == datetime(2026, 11, 25, 2, 0)  # strictly after
    assert cron.next_after(datetime(2026, 12, 31, 23, 59)) == datetime(2027, 1, 1, 2, 0)


def test_steps_lists_and_ranges():
    assert parse_cron("*/15 * * * *").next_after(datetime(2026, 1, 1, 10, 7, 30)) == datetime(2026, 1, 1, 10, 15)
    assert parse_cron("5,35 8-9 * * *").next_after(datetime(2026, 1, 1, 9, 40)) == datetime(2026, 1, 2, 8, 5)
    friday = datetime(2026, 11, 27, 10, 0)
    assert friday.isoweekday() == 5
    monday_nine = parse_cron("0 9 * * 1-5").next_after(friday)
    assert monday_nine == datetime(2026, 11, 30, 9, 0) and monday_nine.isoweekday() == 1
    assert parse_cron("0 0 * * 7").next_after(friday).isoweekday() == 7  # 7 is Sunday too


def test_day_of_month_or_day_of_week_when_both_are_restricted():
    cron = parse_cron("0 0 13 * 5")  # the 13th, or any Friday
    start = datetime(2026, 11, 1)
    hits = []
    moment = start
    while len(hits) < 10:  # November 13 2026 is a Friday; December 13 is not
        moment = cron.next_after(moment)
        hits.append(moment)
    assert all(h.day == 13 or h.isoweekday() == 5 for h in hits)
    assert any(h.day == 13 and h.isoweekday() != 5 for h in hits)
    assert all(b - a <= timedelta(days=7) for a, b in zip(hits, hits[1:]))


def test_february_thirtieth_never_matches():
    with pytest.raises(CronError, match="never matches"):
        parse_cron("0 0 30 2 *").next_after(datetime(2026, 1, 1))


@pytest.mark.parametrize("text, message", [
    ("61 * * * *", "minute field"), ("* 24 * * *", "hour field"), ("* * *", "5 fields"),
    ("a * * * *", "minute field 'a'"), ("*/0 * * * *", "step"), ("* * 0 * *", "day of month"),
    ("* * * 13 *", "month field"), ("* * * * 8", "day of week field"),
])
def test_bad_expressions_name_the_field(text, message):
    with pytest.raises(CronError, match=message):
        parse_cron(text)


@pytest.mark.parametrize("text", ["0 2 * * * 30", "0 0 2 * * * 2030", "@daily"])
def test_seconds_years_and_nicknames_are_refused(text):
    """croniter reads a 6th field as seconds and a 7th as years; schedules are minute-grained."""
    with pytest.raises(CronError, match="expected 5 fields"):
        parse_cron(text)


def test_a_time_with_an_offset_is_the_same_instant_in_local_time(utc_plus_one):
    aware = datetime(2026, 12, 3, 0, 30, tzinfo=timezone.utc)  # 01:30 local
    assert local_time(aware) == datetime(2026, 12, 3, 1, 30)
    assert local_time(datetime(2026, 12, 3, 1, 30)) == datetime(2026, 12, 3, 1, 30)  # naive: local already
    cron = parse_cron("0 2 * * *")  # 02:00 local time
    assert cron.next_after(aware) == datetime(2026, 12, 3, 2, 0) == cron.next_after(local_time(aware))
    east = timezone(timedelta(hours=5, minutes=30))
    assert cron.next_after(datetime(2026, 12, 3, 6, 29, tzinfo=east)) == datetime(2026, 12, 3, 2, 0)  # 01:59 local
    assert cron.next_after(datetime(2026, 12, 3, 6, 31, tzinfo=east)) == datetime(2026, 12, 4, 2, 0)  # 02:01 local
