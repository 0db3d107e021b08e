"""Times as the service writes them: RFC 3339 in UTC, to the millisecond or the second."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def now_ms() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2026-11-26T18:25:40.123Z``."""
    return _utc_now("milliseconds")


def in_ms(seconds: float) -> str:
    """``now_ms`` of ``seconds`` from now."""
    return rfc3339_ms(datetime.now(UTC) + timedelta(seconds=seconds))


def parse_time(stamp: str) -> datetime:
    """A time as ``now_ms`` and ``now_s`` write it."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def seconds_between(start: str, end: str) -> float:
    """Seconds from one ``now_ms`` time to a later one."""
    return (parse_time(end) - parse_time(start)).total_seconds()


def seconds_until(stamp: str) -> float:
    """Seconds from now until ``stamp`` (negative once it has passed)."""
    return (parse_time(stamp) - datetime.now(UTC)).total_seconds()


def rfc3339_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_s() -> str:
    """The current UTC time as RFC 3339 in whole seconds, e.g. ``2026-11-26T18:25:40Z``."""
    return _utc_now("seconds")


def _utc_now(timespec: str) -> str:
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
