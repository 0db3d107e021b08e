"""The helper channels (``guest.channel``) of this host's VMs: one per machine, opened at its
first session and kept while it works, so that each session costs no new sync."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from goldclone.drivers.base import Driver
from goldclone.guest.channel import Channel


class Channels:
    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._open: dict[str, Channel] = {}
        self._opening: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def of(self, machine: str, name: str) -> Channel:
        """The machine's channel, ``name`` being what errors call it; raises
        ``ExecUnavailable`` when its guest has no helper that answers."""
        async with self._opening[machine]:
            channel = self._open.get(machine)
            if channel is None or channel.closed.is_set():
                channel = await Channel.open(lambda: self._driver.open_channel(machine), name)
                self._open[machine] = channel
                channel.closed_callback = lambda: self._forget(machine, channel)
            return channel

    def _forget(self, machine: str, channel: Channel) -> None:
        if self._open.get(machine) is channel:
            del self._open[machine]
            if not self._opening[machine].locked():
                del self._opening[machine]

    async def close(self) -> None:
        for channel in list(self._open.values()):
            await channel.close()
