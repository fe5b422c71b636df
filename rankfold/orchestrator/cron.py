"""Five-field cron expressions ("m h dom mon dow"): parse, and find the next matching minute.

Supports `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n` and `a-b/n`; Sunday is 0 or 7. As in
Vixie cron, when both day-of-month and day-of-week are restricted a day matching either counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


class CronError(ValueError):
    """A cron expression that cannot be parsed; names the field."""


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool             # day of month is *
    any_weekday: bool         # day of week is *

    def day_matches(self, moment: datetime) -> bool:
        in_month = moment.day in self.days
        in_week = (moment.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after `moment` (seconds dropped)."""
        candidate = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 5):  # day by day, then the hour and minute inside the day
            if candidate.month in self.months and self.day_matches(candidate):
                for hour in sorted(h for h in self.hours if h >= candidate.hour):
                    first = candidate.minute if hour == candidate.hour else 0
                    minutes = [m for m in sorted(self.minutes) if m >= first]
                    if minutes:
                        return candidate.replace(hour=hour, minute=minutes[0])
            candidate = (candidate + timedelta(days=1)).replace(hour=0, minute=0)
        raise CronError(f"cron {self.text!r} never matches")


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                start, stop = low, high
            elif "-" in base:
                start, stop = (int(v) for v in base.split("-", 1))
            else:
                start = stop = int(base)
                if step_text:
                    stop = high
        except ValueError:
            raise CronError(f"cron {name} field {text!r}: not a number, range, list or step") from None
        if step < 1 or not low <= start <= stop <= high:
            raise CronError(f"cron {name} field {text!r}: values must lie in {low}-{high} with a step ≥ 1")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


def parse_cron(text: str) -> Cron:
    parts = text.split()
    if len(parts) != 5:
        raise CronError(f"cron {text!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
    fields = [_field(part, name, low, high) for part, (name, low, high) in zip(parts, FIELDS)]
    weekdays = frozenset(0 if day == 7 else day for day in fields[4])
    return Cron(text, fields[0], fields[1], fields[2], fields[3], weekdays, parts[2] == "*", parts[4] == "*")
