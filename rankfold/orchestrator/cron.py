"""Five-field cron expressions ("m h dom mon dow"): parse, and find the next matching minute.

The matching is croniter's: `*`, numbers, names (`mon`, `jan`), ranges `a-b`, lists `a,b`, steps `*/n`
and `a-b/n`; Sunday is 0 or 7. When both day-of-month and day-of-week are restricted a day matching
either counts (croniter's default `day_or=True`, as in Vixie cron). croniter also takes 6 and 7 fields
(seconds, years) and `@daily`; the schedules are minute-grained, so only 5 fields are accepted here.

Times are this machine's local wall-clock time, naive (as cron's own). A time with a UTC offset
(`2026-12-03T07:01:00+00:00`) is the same instant converted to local time (`local_time`), so naive
and aware times never meet in one comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from croniter import CroniterBadDateError, CroniterError, croniter

from rankfold.core.errors import BadInput

FIELDS = ("minute", "hour", "day of month", "month", "day of week")


class CronError(BadInput, ValueError):
    """A cron expression that cannot be parsed or never matches; names the expression and the field."""


@dataclass(frozen=True)
class Cron:
    text: str

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after `moment` (naive local time, seconds dropped; an aware
        `moment` is converted to local time first). Raises CronError when the expression never matches."""
        try:
            return croniter(self.text, local_time(moment)).get_next(datetime)
        except CroniterBadDateError:
            raise CronError(f"cron {self.text!r} never matches") from None


def local_time(moment: datetime) -> datetime:
    """`moment` as naive local wall-clock time: an aware one converted to this machine's zone, a naive
    one taken as local already."""
    return moment if moment.tzinfo is None else moment.astimezone().replace(tzinfo=None)


def _bad_field(parts: list[str]) -> str | None:
    """croniter's messages do not say which field is wrong: probe each one alone."""
    for index, name in enumerate(FIELDS):
        probe = ["*"] * len(FIELDS)
        probe[index] = parts[index]
        if not croniter.is_valid(" ".join(probe)):
            return f"{name} field {parts[index]!r}"
    return None


def parse_cron(text: str) -> Cron:
    parts = text.split()
    if len(parts) != len(FIELDS):
        raise CronError(f"cron {text!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                        f"got {len(parts)}")
    try:
        croniter(text)
    except (CroniterError, ValueError) as err:  # croniter's errors are ValueErrors; some are bare ones
        where = _bad_field(parts) or "fields"
        raise CronError(f"cron {text!r}: {where} is not a valid value, range, list or step ({err})") from None
    return Cron(text)
