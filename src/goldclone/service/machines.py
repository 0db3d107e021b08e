"""Bringing up one machine, the same for a VM and for a machine that a warm pool keeps: its
NIC, then a boot or a restore from a memory template, the restored guest's own identity, and
its IP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from goldclone.drivers.base import Driver, MachineSpec, Runtime
from goldclone.egress import DEFAULT_REACH, Reach

PERSONALIZE_TIMEOUT = 300.0
"""Seconds a restored guest's agent has to answer and take its identity: a few seconds as a
rule (bench/RESULTS.md, m), but a guest on a loaded host under TCG is slow, so as long as a
guest has to get its IP."""


async def bring_up(
    driver: Driver,
    spec: MachineSpec,
    network_type: str,
    attached: Callable[[Runtime], Awaitable[None]],
    ip_timeout: float,
    reach: Reach = DEFAULT_REACH,
) -> tuple[Runtime, str]:
    """Attach the cloned ``spec.machine`` to ``network_type``, to reach what ``reach`` says,
    tell ``attached`` (which
    records the runtime, so that a failure later can be cleaned up), start it, give a restored
    guest ``spec.guest``'s identity, and wait for its IP: the runtime and the IP."""
    runtime = await driver.attach(spec.machine, network_type, reach)
    await attached(runtime)
    await driver.start(spec, runtime)
    if spec.restore:
        await driver.personalize(runtime, spec.guest, PERSONALIZE_TIMEOUT)
    return runtime, await driver.wait_for_ip(runtime, ip_timeout)
