"""The virtual hardware a machine gets beyond its disks and NIC. A memory template's saved
device state fixes it: a machine restored from a template must have that template's, so each
template records its own, and templates of releases before the record load as they were made."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from goldclone.drivers.base import TemplateFiles
from goldclone.host.files import write_atomically


@dataclass(frozen=True)
class Hardware:
    """``machine_type``: QEMU's ``-machine``; ``exec_port``: the helper's virtio-serial port
    (``guest.helper``), which releases before it did not have."""

    machine_type: str = "pc"
    exec_port: bool = True


CURRENT = Hardware()
UNRECORDED = Hardware(exec_port=False)
"""A template made before templates recorded their hardware."""


def of_template(files: TemplateFiles) -> Hardware:
    """The hardware ``files``' template was made with; blocking."""
    try:
        recorded = json.loads(files.hardware.read_text())
    except FileNotFoundError:
        return UNRECORDED
    return Hardware(**recorded)


def record(files: TemplateFiles, hardware: Hardware) -> None:
    """Write ``hardware`` into the template's folder (read-only); blocking."""
    write_atomically(files.hardware, json.dumps(asdict(hardware)).encode(), 0o400)
