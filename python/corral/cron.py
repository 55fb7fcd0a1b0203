"""Cron expressions, as Vixie cron (and Kubernetes' CronJob) read them, in an explicit
time zone.

Five fields, minute hour day-of-month month day-of-week: ``*``, numbers, ranges ``a-b``,
lists ``a,b``, steps ``*/n`` and ``a-b/n``, month and day names (``jan``, ``mon``), day 7
as Sunday, and the shorthands ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``,
``@monthly``, ``@yearly`` (``@annually``). When both day fields are restricted, a day
matching either counts (as in Vixie cron).

Times are wall-clock times of the zone: a time the clocks skip (spring forward) does not
happen, and one they pass twice (fall back) happens once, the first time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Cron", "zone"]

_SHORT = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, _MONTHS),
           ("day of week", 0, 7, _DAYS))


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (``UTC``, ``Europe/Paris``); ``ValueError`` naming it when
    this machine does not know it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Paris)") from None


def _field(text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_s = part.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) == 0:
                raise ValueError(f"{name}: bad step {step_s!r}")
            step = int(step_s)
        if rng == "*":
            a, b = lo, hi
        else:
            a_s, dash, b_s = rng.partition("-")
            a = _value(a_s, name, lo, hi, names)
            b = _value(b_s, name, lo, hi, names) if dash else (hi if step_s else a)
            if b < a:
                raise ValueError(f"{name}: range {rng!r} runs backwards")
        out.update(range(a, b + 1, step))
    return frozenset(out)


def _value(s: str, name: str, lo: int, hi: int, names: dict[str, int]) -> int:
    v = names.get(s.lower()) if names else None
    if v is None:
        if not s.isdigit():
            raise ValueError(f"{name}: {s!r} is not a number{' or a name' if names else ''}")
        v = int(s)
    if not lo <= v <= hi:
        raise ValueError(f"{name}: {v} is outside {lo}-{hi}")
    return v


@dataclass(frozen=True)
class Cron:
    """One expression; :meth:`next_after` is when it next fires."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """``ValueError`` says which field is wrong and why."""
        expr = _SHORT.get(text.strip().lower(), text)
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {len(parts)}")
        sets = [_field(p, *f) for p, f in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(text, sets[0], sets[1], sets[2], sets[3], weekdays, parts[2] == "*", parts[4] == "*")

    def _day_ok(self, d: dt.date) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, after: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
        """The first time, strictly after ``after`` (aware), that the expression fires in
        ``tz``; ``ValueError`` when it never does (``0 0 30 2 *``)."""
        local = after.astimezone(tz).replace(second=0, microsecond=0, tzinfo=None) + dt.timedelta(minutes=1)
        day = local.date()
        for _ in range(366 * 5):  # a leap day on a given weekday repeats within 28 years; 5 is enough for sense
            if day.month in self.months and self._day_ok(day):
                for h in sorted(self.hours):
                    for m in sorted(self.minutes):
                        naive = dt.datetime.combine(day, dt.time(h, m))
                        if naive < local:
                            continue
                        when = naive.replace(tzinfo=tz, fold=0)
                        back = when.astimezone(dt.UTC).astimezone(tz).replace(tzinfo=None)
                        if back != naive:
                            continue  # skipped by the clocks (spring forward)
                        return when
            day += dt.timedelta(days=1)
        raise ValueError(f"{self.text!r} never fires")

    def count_between(self, start: dt.datetime, end: dt.datetime, tz: dt.tzinfo, cap: int = 100_000) -> int:
        """How many times it fired after ``start`` up to ``end`` (at most ``cap``)."""
        n, t = 0, start
        while n < cap:
            t = self.next_after(t, tz)
            if t > end:
                break
            n += 1
        return n
