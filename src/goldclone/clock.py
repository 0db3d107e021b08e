"""Times: aware UTC datetimes in the service and the store, RFC 3339 in UTC on the wire
(a ``Moment`` to the millisecond, a ``Second`` to the second)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, PlainSerializer


def now() -> datetime:
    """Now, to the millisecond: as precise as the wire and the store keep it, so that a time
    read back equals the one written."""
    return _to_ms(datetime.now(UTC))


def after(seconds: float) -> datetime:
    """The time ``seconds`` from now (before it, if negative), to the millisecond."""
    return _to_ms(datetime.now(UTC) + timedelta(seconds=seconds))


def _to_ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def now_s() -> datetime:
    """Now, to the whole second, for the times that the wire shows to the second."""
    return now().replace(microsecond=0)


def seconds_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def seconds_until(moment: datetime) -> float:
    """Seconds from now until ``moment`` (negative once it has passed)."""
    return seconds_between(now(), moment)


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def rfc3339_ms(moment: datetime) -> str:
    """``moment`` as the wire writes it, e.g. ``2026-11-26T18:25:40.123Z``."""
    return utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(stamp: str) -> datetime:
    return utc(datetime.fromisoformat(stamp))


def rfc3339_s(moment: datetime) -> str:
    """``moment`` to the second, e.g. ``2026-11-26T18:25:40Z``."""
    return utc(moment).isoformat(timespec="seconds").replace("+00:00", "Z")


Moment = Annotated[
    datetime, AfterValidator(utc), PlainSerializer(rfc3339_ms, return_type=str, when_used="json")
]
"""A time of a model, written to the millisecond."""

Second = Annotated[
    datetime, AfterValidator(utc), PlainSerializer(rfc3339_s, return_type=str, when_used="json")
]
"""A time of a model, written to the second."""
