"""``GuestConfig``: the configuration of one guest, secrets included.

It lives only in memory, from the ``POST /vms`` that asks for it to the driver that hands it to
the guest: the store keeps the VM object, which shows the user data's sha256 and the metadata's
keys but never their values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from goldclone.models import CreateVMRequest


@dataclass(frozen=True)
class GuestConfig:
    instance_id: str
    """cloud-init's instance ID: the VM's ID, so that each VM is a first boot."""
    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    user_data: str | None = field(default=None, repr=False)
    metadata: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, vm_id: str, request: CreateVMRequest) -> GuestConfig:
        return cls(
            instance_id=vm_id,
            hostname=request.name or default_hostname(vm_id),
            ssh_authorized_keys=tuple(request.ssh_authorized_keys),
            user_data=request.user_data,
            metadata=dict(request.metadata),
        )

    @property
    def needs_first_boot(self) -> bool:
        """Whether the user data is a ``#cloud-config`` document, which cloud-init applies at
        an instance's first boot: a guest restored from a template has had that boot."""
        return needs_first_boot(self.user_data)

    @property
    def user_data_sha256(self) -> str | None:
        return None if self.user_data is None else sha256_of(self.user_data)


def needs_first_boot(user_data: str | None) -> bool:
    """Whether ``user_data`` is a ``#cloud-config`` document (anything but a ``#!`` script),
    which only cloud-init's first boot of an instance applies."""
    return user_data is not None and not user_data.startswith("#!")


def default_hostname(vm_id: str) -> str:
    """``vm-`` and the first group of the VM's ID, e.g. ``vm-1f0c9a2e``."""
    return f"vm-{vm_id.split('-')[0]}"


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
