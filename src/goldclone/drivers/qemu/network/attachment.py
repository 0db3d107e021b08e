"""One machine's NIC on a QEMU network: the QEMU driver's ``Runtime``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from goldclone.drivers.base import Runtime
from goldclone.egress import Reach


@dataclass(frozen=True)
class Attachment(Runtime):
    """One machine's NIC: the tap QEMU opens, the bridge it is on and the MAC the guest gets."""

    bridge: str
    tap: str
    ip: str = ""
    """The address fixed for it before it started: on owned networks, the only one its DHCP
    server gives it and its rules let it send from. Empty on ``bridged``, and in records of
    releases before addresses were fixed."""
    group: str = ""
    egress: str = ""
    """Its ``Reach``, as ``Reach.record`` writes it."""

    @property
    def reach(self) -> Reach:
        return Reach.from_record({"group": self.group, "egress": self.egress})

    @classmethod
    def from_record(cls, machine: str, record: Mapping[str, str]) -> Attachment:
        """Rebuild an attachment from ``record()``; records made before runtimes named their
        machine have no ``machine``, which is then the VM's ID."""
        return cls(
            machine=record.get("machine", machine),
            network_type=record["network_type"],
            mac=record["mac"],
            bridge=record["bridge"],
            tap=record["tap"],
            ip=record.get("ip", ""),
            **Reach.from_record(record).record(),
        )
