"""Where a guest on the host's bridge got its address from a DHCP server that is not ours: the
DHCP ACK seen on its tap, the server's lease file if configured, or the bridge's neighbours."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from goldclone.drivers.qemu.network import bridge, dnsmasq_leases
from goldclone.drivers.qemu.network.attachment import Attachment
from goldclone.drivers.qemu.network.sniffer import DhcpAckSniffer

log = logging.getLogger(__name__)

POLL = 1.0


class BridgedAddresses:
    def __init__(self, lease_file: Path | None) -> None:
        self._lease_file = lease_file
        self._sniffers: dict[str, DhcpAckSniffer] = {}

    def watch(self, attachment: Attachment) -> DhcpAckSniffer | None:
        """Start listening on ``attachment``'s tap for the ACK its DHCP server sends it."""
        sniffer = DhcpAckSniffer(attachment.tap, attachment.mac)
        try:
            sniffer.start()
        except OSError as e:
            log.warning("cannot watch %s for DHCP (%s); using other sources", attachment.tap, e)
            return None
        self._sniffers[attachment.tap] = sniffer
        return sniffer

    async def known(self, attachment: Attachment) -> str | None:
        """The address the lease file or the neighbour table gives the guest now, if any."""
        if self._lease_file is not None:
            ip = dnsmasq_leases.lookup(self._lease_file, attachment.mac)
            if ip is not None:
                return ip
        return await bridge.neighbour_ip(attachment.bridge, attachment.mac)

    async def find(self, attachment: Attachment) -> str:
        """The guest's address, once any of the three sources has it."""
        sniffer = self._sniffers.get(attachment.tap) or self.watch(attachment)
        while True:
            if sniffer is not None and sniffer.ip is not None:
                return sniffer.ip
            if (ip := await self.known(attachment)) is not None:
                return ip
            if sniffer is None:
                await asyncio.sleep(POLL)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):
                    await sniffer.wait()

    async def stop(self, tap: str) -> None:
        """Stop listening on ``tap``, if this was."""
        if (sniffer := self._sniffers.pop(tap, None)) is not None:
            await sniffer.close()

    async def close(self) -> None:
        for tap in list(self._sniffers):
            await self.stop(tap)
