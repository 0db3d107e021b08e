"""cloud-init's NoCloud seed: an ISO 9660 volume labelled ``cidata`` holding ``meta-data``,
``user-data`` and ``network-config``, which the QEMU driver attaches read-only to each VM.

``meta-data`` carries the instance ID, the hostname, the SSH keys (``public-keys``, which
cloud-init gives the image's default user) and the request's ``metadata`` under
``goldclone_metadata``. The volume is written with pycdlib, with Rock Ridge and Joliet names, so
that Linux sees the file names cloud-init looks for.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pycdlib

from goldclone.guest.config import GuestConfig
from goldclone.host.files import write_atomically

LABEL = "cidata"
METADATA_KEY = "goldclone_metadata"
"""Where ``meta-data`` keeps the request's ``metadata``: in the guest, cloud-init shows it as
``ds.meta_data.goldclone_metadata`` (``cloud-init query``) and in its instance data."""

_NO_USER_DATA = "#cloud-config\n{}\n"


def meta_data(guest: GuestConfig) -> dict[str, Any]:
    return {
        "instance-id": guest.instance_id,
        "local-hostname": guest.hostname,
        "public-keys": list(guest.ssh_authorized_keys),
        METADATA_KEY: dict(guest.metadata),
    }


def network_config(mac: str) -> dict[str, Any]:
    """DHCP on the NIC with ``mac``, whatever the guest names it; the client ID is the MAC, as
    the network's DHCP server knows guests by it."""
    return {
        "version": 2,
        "ethernets": {
            "nic0": {"match": {"macaddress": mac}, "dhcp4": True, "dhcp-identifier": "mac"}
        },
    }


def seed_files(guest: GuestConfig, mac: str) -> dict[str, bytes]:
    """The seed's files by name. JSON is YAML, which cloud-init reads; one key per line, so
    that a guest without a JSON parser (the demo guest) can read it too."""

    def document(value: dict[str, Any]) -> bytes:
        return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()

    return {
        "meta-data": document(meta_data(guest)),
        "user-data": (guest.user_data or _NO_USER_DATA).encode(),
        "network-config": document(network_config(mac)),
    }


def write_seed(path: Path, guest: GuestConfig, mac: str) -> None:
    """Write the seed volume to ``path`` (mode 0600: it holds the user data), through a
    temporary file, so that a half-written seed is never attached. Blocking: run it in a
    worker thread."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=4, vol_ident=LABEL, joliet=3, rock_ridge="1.09")
    for name, data in seed_files(guest, mac).items():
        iso.add_fp(io.BytesIO(data), len(data), f"/{name.upper()};1",
                   rr_name=name, joliet_path=f"/{name}")  # fmt: skip
    try:
        write_atomically(path, iso.write_fp, 0o600)
    finally:
        iso.close()
