"""Admission: whether this host takes a create request, and recording it once.

A request is checked against this host's per-VM bounds, its driver's capabilities and the
outbound URL policy (400s), then admitted in one store transaction that checks the host's
totals (409 ``capacity-exceeded``) and the ``Idempotency-Key``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence

from goldclone.drivers.base import Capabilities
from goldclone.errors import CapacityExceeded, IdempotencyConflict, InvalidRequest, URLForbidden
from goldclone.guest.config import GuestConfig
from goldclone.models import (
    VM,
    CreateVMRequest,
    Phase,
    ReadyWhen,
    TimelineEntry,
    now_ms,
    now_s,
)
from goldclone.outbound.policy import OutboundPolicy
from goldclone.service.leases import LeasePolicy
from goldclone.service.store import Earlier, Held, Store
from goldclone.settings import Limits


class Admission:
    """Checks and records the create requests of one host."""

    def __init__(
        self,
        limits: Limits,
        capabilities: Capabilities,
        store: Store,
        policy: OutboundPolicy,
        leases: LeasePolicy,
    ) -> None:
        self._limits = limits
        self.leases = leases
        self._capabilities = capabilities
        self._store = store
        self._policy = policy

    async def admit(
        self, request: CreateVMRequest, idempotency_key: str | None, pools: Sequence[str] = ()
    ) -> tuple[VM, GuestConfig | None]:
        """The VM recorded for ``request``, ``creating`` (with a machine claimed from one of
        ``pools`` if one has a ready machine), and its guest's configuration; or the VM that
        an earlier request with the same ``idempotency_key`` and body made, and ``None``.
        The same key with another body is an ``IdempotencyConflict``."""
        self.check(request)
        expires_at = self.leases.expiry(request.ttl, "ttl" in request.model_fields_set)
        digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
        guest = GuestConfig.of(str(uuid.uuid4()), request)
        idempotency = (idempotency_key, digest) if idempotency_key is not None else None
        capacity = self.capacity_check(Held(request.cpus, request.memory))
        recorded = await self._store.admit(
            _new_vm(request, guest, expires_at), idempotency, capacity, pools
        )
        if isinstance(recorded, Earlier):
            return _repeat(recorded, digest), None
        return recorded, guest

    def check(self, request: CreateVMRequest) -> None:
        """Raise ``InvalidRequest`` for a request this host would never take."""
        self.check_shape(request.cpus, request.memory, request.ready_when)
        self.check_network(request.network_type)
        self.check_url("image.url", request.image.url)
        if request.callback_url is not None:
            self.check_url("callback_url", request.callback_url)

    def check_shape(self, cpus: int, memory: int, ready_when: ReadyWhen | None) -> None:
        """Raise ``InvalidRequest`` for CPUs, memory or a probe this host would never take."""
        limits = self._limits
        if not limits.min_cpus <= cpus <= limits.max_cpus:
            raise InvalidRequest(
                f"cpus: must be between {limits.min_cpus} and {limits.max_cpus} on this host"
            )
        if not limits.min_memory_mb <= memory <= limits.max_memory_mb:
            raise InvalidRequest(
                f"memory: must be between {limits.min_memory_mb} and "
                f"{limits.max_memory_mb} MB on this host"
            )
        if ready_when is not None and ready_when.guest_agent and not self._capabilities.guest_agent:
            raise InvalidRequest(
                "ready_when.guest_agent: this host's driver cannot ask a guest agent"
            )

    def check_network(self, network_type: str) -> None:
        offered = self._capabilities.network_types
        if network_type not in offered:
            reason = self._capabilities.unavailable_networks.get(network_type)
            raise InvalidRequest(
                f"network_type: {reason or 'must be one of ' + ', '.join(offered)}"
            )

    def check_url(self, field: str, url: str) -> None:
        """A URL whose host is an address is checked now; a name, when it is connected to."""
        try:
            self._policy.check_literal(url)
        except URLForbidden as exc:
            raise InvalidRequest(f"{field}: {exc.message}") from None

    def capacity_check(self, wanted: Held) -> Callable[[list[Held]], None] | None:
        """What raises ``CapacityExceeded`` if a machine of shape ``wanted`` would take the
        host past a total, given what is held; ``None`` when the host has no totals (no need
        to read every VM on each create)."""
        limits = self._limits
        if all(t is None for t in (limits.max_vms, limits.total_cpus, limits.total_memory_mb)):
            return None

        def check(held: list[Held]) -> None:
            for name, total, used, asked in (
                ("VMs", limits.max_vms, len(held), 1),
                ("vCPUs", limits.total_cpus, sum(h.cpus for h in held), wanted.cpus),
                ("MB of memory", limits.total_memory_mb, sum(h.memory for h in held),
                 wanted.memory),
            ):  # fmt: skip
                if total is not None and used + asked > total:
                    raise CapacityExceeded(
                        f"this host allows {total} {name} in all; {used} are in use (VMs and "
                        f"warm pools) and this VM needs {asked}"
                    )

        return check


def _repeat(earlier: Earlier, digest: str) -> VM:
    if earlier.digest != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was used with another request body; use a new key"
        )
    return earlier.vm


def _new_vm(request: CreateVMRequest, guest: GuestConfig, expires_at: str | None) -> VM:
    return VM(
        id=guest.instance_id,
        image=request.image,
        cpus=request.cpus,
        memory=request.memory,
        network_type=request.network_type,
        headless=request.headless,
        callback_url=request.callback_url,
        ready_when=request.ready_when,
        name=request.name,
        hostname=guest.hostname,
        ssh_authorized_keys=list(guest.ssh_authorized_keys),
        user_data_sha256=guest.user_data_sha256,
        metadata_keys=list(guest.metadata),
        start=request.start,
        labels=request.labels,
        expires_at=expires_at,
        created_at=now_s(),
        timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now_ms())],
    )
