"""What a machine restored from a template is given through its guest agent: the host's
clock, a machine of its own, and the identity its request asked for."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from goldclone.drivers.qemu.agent import AgentLink
from goldclone.errors import QMPError, QMPRefused
from goldclone.guest import hostkeys, identity
from goldclone.guest.config import GuestConfig

log = logging.getLogger(__name__)

CLOCK_TOLERANCE_NS = 500_000_000
CLOCK_TIMEOUT = 20.0
CLOCK_ATTEMPTS = 3
SEED_BYTES = 32
"""Bytes of the host's randomness a restored guest's random pool is reseeded with."""


async def personalize(
    link: AgentLink, guest: GuestConfig, timeout: float, new_machine: bool
) -> None:
    """Set the guest's clock to the host's, make it a machine of its own if it is new
    (``identity.new_machine_script``), and write ``guest``'s identity into it
    (``identity.files``)."""
    account = identity.default_account(await _text_of(link, "/etc/passwd"))
    if new_machine:
        # host keys only for a guest with an SSH server: a burst of restores of the demo
        # guest waited on RSA keys it has no use for
        wanted = bool(await _text_of(link, hostkeys.SSHD_CONFIG))
        keys = await asyncio.to_thread(hostkeys.new_host_keys) if wanted else []
        seed = secrets.token_bytes(SEED_BYTES)
        script = identity.new_machine_script(account, keys, seed, time.time_ns())
        await link.run_script(script, timeout)
    await _set_clock(link)  # checked, and set where the script could not
    for file in identity.files(guest, account):
        await link.write_file(file.path, file.content)
    if (user_data := identity.user_data_script(guest)) is not None:
        await link.start_command(user_data)


async def _text_of(link: AgentLink, path: str) -> str:
    """The guest's file ``path``; empty in a guest without one (the demo guest has neither
    ``/etc/passwd`` nor an SSH server)."""
    try:
        return await link.read_file(path)
    except QMPRefused:
        return ""


async def _set_clock(link: AgentLink) -> None:
    """Set the guest's clock to the host's, unless it is right already. qemu-ga sets it, then
    runs ``hwclock -w``, which some images lack (Debian has it in util-linux-extra): that
    error does not count if the clock is right. A guest just restored can be slow to answer,
    and then sets a time that is late by as much: so a slow or failed set is checked, and done
    again if need be."""
    if await _clock_skew(link) <= CLOCK_TOLERANCE_NS:
        return
    trouble = "no answer"
    for _ in range(CLOCK_ATTEMPTS):
        sent = time.time_ns()
        try:
            await link.execute("guest-set-time", {"time": sent}, timeout=CLOCK_TIMEOUT)
            if time.time_ns() - sent <= CLOCK_TOLERANCE_NS:
                return
            trouble = "a slow answer"
        except QMPError as exc:
            trouble = exc.message
        skew = await _clock_skew(link)
        if skew <= CLOCK_TOLERANCE_NS:
            return
        log.debug("guest-set-time: %s; the clock is %d ms off", trouble, skew // 10**6)
    raise QMPError(f"the guest's clock is still {skew / 1e9:.1f} s off ({trouble})")


async def _clock_skew(link: AgentLink) -> int:
    """How far (ns) the guest's clock is from the host's, at least: the guest read it at some
    moment between the ask and the answer, which on a loaded host are far apart."""
    asked = time.time_ns()
    guest = int(await link.execute("guest-get-time"))
    answered = time.time_ns()
    return max(0, asked - guest, guest - answered)
