"""What the VMware driver is told: where ``vmrun`` is, which product it drives, and more."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

HOST_TYPES: Final = ("auto", "fusion", "ws")

DEFAULT_LEASE_FILES: Final = (
    # macOS (Fusion): vmnet-dhcpd's lease files for the NAT and host-only networks
    Path("/var/db/vmware/vmnet-dhcpd-vmnet8.leases"),
    Path("/var/db/vmware/vmnet-dhcpd-vmnet1.leases"),
    # Linux (Workstation)
    Path("/etc/vmware/vmnet8/dhcpd/dhcpd.leases"),
    Path("/etc/vmware/vmnet1/dhcpd/dhcpd.leases"),
)


@dataclass(frozen=True)
class VMwareConfig:
    """Settings of the ``vmware`` driver.

    ``vmrun`` is a path or a command name; ``None`` looks on ``PATH`` and then in the usual
    install places of Fusion and Workstation. ``host_type`` is vmrun's ``-T``: ``fusion``,
    ``ws``, or ``auto`` (``fusion`` on macOS or for a vmrun inside ``VMware Fusion.app``,
    else ``ws``). With ``gui_fallback``, a headless start that vmrun refuses is tried again
    with a window (Fusion 7 and some Workstation hosts refuse ``nogui``). ``lease_files`` are
    vmnet-dhcpd lease files (ISC format) read when ``getGuestIPAddress`` has no answer; missing
    ones are skipped. ``command_timeout`` bounds every vmrun call that has no other limit.
    """

    vmrun: str | None = None
    host_type: str = "auto"
    gui_fallback: bool = True
    lease_files: tuple[Path, ...] = field(default=DEFAULT_LEASE_FILES)
    command_timeout: float = 120.0
    snapshot_name: str = "goldclone"

    def __post_init__(self) -> None:
        if self.host_type not in HOST_TYPES:
            raise ValueError(f"host_type must be one of {', '.join(HOST_TYPES)}")
        if not self.snapshot_name or '"' in self.snapshot_name:
            raise ValueError("snapshot_name must be a non-empty name without quotes")
