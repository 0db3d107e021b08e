"""Each VM's lifecycle in the log: one line per phase, with the VM's ID and how long the phase
before took."""

from __future__ import annotations

import logging

from goldclone.clock import seconds_between
from goldclone.models import VM, Phase

log = logging.getLogger("goldclone.vm")


def accepted(vm: VM) -> None:
    log.info("VM %s accepted: image %s, %d CPU(s), %d MB, %s, from %s", vm.id, vm.image.key,
             vm.cpus, vm.memory, vm.network_type, vm.started_from)  # fmt: skip


def phase_added(vm: VM) -> None:
    last, took = vm.timeline[-1], ""
    if len(vm.timeline) > 1:
        before = vm.timeline[-2]
        took = f" ({before.phase.value} took {seconds_between(before.at, last.at):.2f} s)"
    where = f" at {vm.ip_address}" if last.phase is Phase.RUNNING else ""
    log.info("VM %s %s%s%s", vm.id, last.phase.value, where, took)
