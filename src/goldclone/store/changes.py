"""Waking, on this service, whoever waits for the next commit, or for the next one that
touches one subject: a ``?wait=true`` woken by every commit re-read its VM each time, and 20 of
them during 20 restores cost the service twice the CPU of waking each for its own VM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

FOLLOW_EVERY = 10.0
"""Seconds after which a host looks again at what other hosts asked of it (DELETEs of its VMs,
creates placed on it, pools made or changed) without hearing of a change."""


class Changes:
    """A counter of this service's commits (and, on PostgreSQL, of every service's: see
    ``store.listener``), a way to wait for the next one, and a way to wait for the next one
    that touches one subject (``watching``)."""

    def __init__(self) -> None:
        self.version = 0
        self._next = asyncio.Event()
        self._watches: dict[str, set[asyncio.Event]] = {}

    def notify(self, subjects: Collection[str] = ()) -> None:
        """Count a commit, which changed ``subjects``; one of unknown subjects (another host's,
        heard without them) wakes every watch."""
        self.version += 1
        self._next.set()
        self._next = asyncio.Event()
        groups = (
            self._watches.values() if not subjects
            else [self._watches.get(subject, set()) for subject in subjects]
        )  # fmt: skip
        for group in groups:
            for event in group:
                event.set()

    @contextlib.contextmanager
    def watching(self, subject: str) -> Iterator[Watch]:
        """A ``Watch`` of the commits that touch ``subject``, from now on: made before the
        subject is read, it misses no change made after that read."""
        event = asyncio.Event()
        group = self._watches.setdefault(subject, set())
        group.add(event)
        try:
            yield Watch(event)
        finally:
            group.discard(event)
            if not group:
                self._watches.pop(subject, None)

    async def follow(
        self,
        work: Callable[[], Awaitable[None]],
        what: str,
        subject: str,
        every: float = FOLLOW_EVERY,
    ) -> None:
        """Run ``work`` now, after each commit that touches ``subject`` (a host's
        ``host_subject``, say: not after every commit of the fleet), and at least every
        ``every`` seconds, for ever; a failed run is logged (as ``what`` failing) and the next
        one tries again."""
        with self.watching(subject) as watch:
            while True:
                try:
                    await work()
                except Exception:
                    log.exception("%s failed; trying again", what)
                await watch.wait(every)

    async def wait(self, seen: int, timeout: float) -> None:
        """Return once ``version`` is past ``seen``, or after ``timeout`` seconds."""
        if self.version == seen:
            await _set_within(self._next, timeout)


@dataclass
class Watch:
    """The commits that touch one subject since the watch began or last woke."""

    _event: asyncio.Event

    async def wait(self, timeout: float) -> bool:
        """Return at the next commit that touches the subject (at once if one came since the
        last wait), or after ``timeout`` seconds: whether such a commit came."""
        woken = await _set_within(self._event, timeout)
        self._event.clear()
        return woken


async def _set_within(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            return await event.wait()
    return False
