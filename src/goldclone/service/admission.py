"""Admission: whether the fleet takes a create request, and recording it once.

A request's URLs are checked against this host's outbound policy (400s); then it is admitted
in one store transaction that places it on a host whose per-VM bounds and driver take it (400
if none does), within that host's totals (409 ``capacity-exceeded``), and checks the
``Idempotency-Key``. Each host offers its bounds to the others in its heartbeat.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from goldclone.access import DEFAULT_TENANT
from goldclone.clock import after, now, now_s
from goldclone.drivers.base import Capabilities
from goldclone.egress import NO_EGRESS_RULES, EgressPolicy, destination, tenant_group
from goldclone.errors import CapacityExceeded, IdempotencyConflict, InvalidRequest, URLForbidden
from goldclone.fields import MIN_MEMORY_MB
from goldclone.guest.config import GuestConfig
from goldclone.image_spec import ImageSpec
from goldclone.models import VM, CreateVMRequest, Phase, ReadyWhen, TimelineEntry
from goldclone.outbound.policy import OutboundPolicy
from goldclone.service.leases import LeasePolicy
from goldclone.service.placement import chooser, full
from goldclone.settings import Limits, PlacementPolicy
from goldclone.shape import Shape
from goldclone.store import admissions
from goldclone.store.admissions import Placing
from goldclone.store.database import Database
from goldclone.store.host_records import Held
from goldclone.store.vm_records import Earlier


class Admission:
    """Checks and records the create requests of one host."""

    def __init__(
        self,
        limits: Limits,
        capabilities: Capabilities,
        db: Database,
        policy: OutboundPolicy,
        leases: LeasePolicy,
        placement: PlacementPolicy = "spread",
        host_lost_after: float = 60.0,
        egress: EgressPolicy = NO_EGRESS_RULES,
    ) -> None:
        self._limits = limits
        self._policy = placement
        self._lost_after = host_lost_after
        self.leases = leases
        self._db = db
        self._outbound = policy
        self.bounds = bounds_of(limits, capabilities, egress)
        """What one VM on this host may be, as this host offers it to the fleet."""

    async def admit(
        self,
        request: CreateVMRequest,
        idempotency_key: str | None,
        pools: Sequence[str] = (),
        tenant: str = DEFAULT_TENANT,
        asked: CreateVMRequest | None = None,
    ) -> tuple[VM, GuestConfig | None]:
        """The VM recorded for ``request``, of ``tenant``, ``creating`` (with a machine claimed
        from one of ``pools`` if one has a ready machine), and its guest's configuration; or
        the VM that an earlier request of the tenant with the same ``idempotency_key`` and
        body made, and ``None``. The same key with another body is an
        ``IdempotencyConflict``; a body is compared as it was ``asked`` (a tag, before it
        was resolved), if it was."""
        self.check_urls(request)
        expires_at = self.leases.expiry(request.ttl, "ttl" in request.model_fields_set)
        digest = hashlib.sha256((asked or request).model_dump_json().encode()).hexdigest()
        guest = GuestConfig.of(str(uuid.uuid4()), request)
        idempotency = (idempotency_key, digest) if idempotency_key is not None else None
        wanted = Held(request.cpus, request.memory, tenant_group(tenant, request.network_group))
        takes = _taker(request)
        choose = chooser(self._policy, wanted, takes, self._db.host_id, request.image.id)
        placing = Placing(request.image.key, Shape.of(request), after(-self._lost_after), choose)
        recorded = await admissions.record(
            self._db,
            _new_vm(request, guest, expires_at, tenant), idempotency, placing, pools,
            request.model_dump_json(),
        )  # fmt: skip
        if isinstance(recorded, Earlier):
            return _repeat(recorded, digest), None
        return recorded, guest

    async def add_member(self, pool: str, machine: str, wanted: Held) -> None:
        """Record a machine that ``pool`` is about to restore on this host, if the host has
        room for it; raises ``CapacityExceeded``."""
        await admissions.add_member(self._db, pool, machine, wanted, self._capacity_check(wanted))

    def check_urls(self, request: CreateVMRequest) -> None:
        self.check_image("image", request.image)
        if request.callback_url is not None:
            self.check_url("callback_url", request.callback_url)

    def check_shape(self, shape: Shape, ready_when: ReadyWhen | None) -> None:
        """Raise ``InvalidRequest`` for a shape or a probe this host would never take."""
        if (refused := shape_refusal(self.bounds, shape, ready_when)) is not None:
            raise InvalidRequest(f"{refused} on this host")

    def check_network(self, network_type: str) -> None:
        if (refused := network_refusal(self.bounds, network_type)) is not None:
            raise InvalidRequest(f"{refused} on this host")

    def check_image(self, field: str, image: ImageSpec) -> None:
        """An image's URL, or its registry (as the URL it is reached by), checked now."""
        if image.id is not None:  # fetched from nowhere
            return
        if (ref := image.reference) is not None:
            self.check_url(f"{field}.oci", f"https://{ref.registry}/")
        else:
            self.check_url(f"{field}.url", image.source)

    def check_url(self, field: str, url: str) -> None:
        """A URL whose host is an address is checked now; a name, when it is connected to."""
        try:
            self._outbound.check_literal(url)
        except URLForbidden as exc:
            raise InvalidRequest(f"{field}: {exc.message}") from None

    def _capacity_check(self, wanted: Held) -> Callable[[list[Held]], None] | None:
        """What raises ``CapacityExceeded`` if a machine of shape ``wanted`` would take this
        host past a total, given what it holds; ``None`` when the host has no totals (no need
        to read every VM)."""
        totals = self._limits.totals()
        if all(total is None for total in totals.values()):
            return None

        def check(held: list[Held]) -> None:
            if (reason := full(totals, held, wanted)) is not None:
                raise CapacityExceeded(f"this host {reason}")

        return check


def bounds_of(
    limits: Limits, capabilities: Capabilities, egress: EgressPolicy = NO_EGRESS_RULES
) -> dict[str, Any]:
    """The per-VM bounds of a host with ``limits``, a driver of ``capabilities`` and the
    operator's ``egress`` policy."""
    least = max(limits.min_memory_mb, MIN_MEMORY_MB)  # what a guest needs, or the host
    return {
        "cpus": [limits.min_cpus, limits.max_cpus],
        "memory": [least, limits.max_memory_mb],
        "guest_agent": capabilities.guest_agent,
        "disk_size": capabilities.grow_disks,
        "network_types": list(capabilities.network_types),
        "unavailable_networks": dict(capabilities.unavailable_networks),
        "walls": capabilities.walls,
        "egress": {"allow": [str(d) for d in egress.allow], "deny": [str(d) for d in egress.deny]},
    }


def shape_refusal(
    bounds: Mapping[str, Any], shape: Shape, ready_when: ReadyWhen | None
) -> str | None:
    """Why a host of ``bounds`` would never take a VM of this shape and probe; ``None`` if it
    would."""
    least, most = bounds["cpus"]
    if not least <= shape.cpus <= most:
        return f"cpus: must be between {least} and {most}"
    least, most = bounds["memory"]
    if not least <= shape.memory <= most:
        return f"memory: must be between {least} and {most} MB"
    if shape.disk_size is not None and not bounds.get("disk_size", False):  # an older host's
        return "disk_size: the driver cannot grow a clone's disk"
    if ready_when is not None and ready_when.guest_agent and not bounds["guest_agent"]:
        return "ready_when.guest_agent: the driver cannot ask a guest agent"
    return None


def network_refusal(bounds: Mapping[str, Any], network_type: str) -> str | None:
    offered = bounds["network_types"]
    if network_type in offered:
        return None
    reason = bounds["unavailable_networks"].get(network_type)
    return f"network_type: {reason or 'must be one of ' + ', '.join(offered)}"


def reach_refusal(bounds: Mapping[str, Any], request: CreateVMRequest) -> str | None:
    """Why a host of ``bounds`` cannot give a VM the ``network_group`` and ``egress`` that
    ``request`` asks for; ``None`` if it can."""
    if request.network_group is None and request.egress is None:
        return None
    if not bounds.get("walls", False):  # a host of a release before walls offers none
        what = "network_group" if request.network_group is not None else "egress"
        return f"{what}: its driver cannot wall VMs off from each other"
    if isinstance(request.egress, list):
        offered = bounds.get("egress", {})
        policy = EgressPolicy(
            tuple(destination(d) for d in offered.get("allow", ())),
            tuple(destination(d) for d in offered.get("deny", ())),
        )
        for wanted in request.egress:
            if (refused := policy.refusal(destination(wanted))) is not None:
                return f"egress: {refused}"
    return None


def _taker(request: CreateVMRequest) -> Callable[[Mapping[str, Any]], str | None]:
    """Why a host of given bounds would never take ``request``; ``None`` if it would."""

    def refusal(bounds: Mapping[str, Any]) -> str | None:
        shape = shape_refusal(bounds, Shape.of(request), request.ready_when)
        network = network_refusal(bounds, request.network_type)
        return shape or network or reach_refusal(bounds, request)

    return refusal


def _repeat(earlier: Earlier, digest: str) -> VM:
    if earlier.digest != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was used with another request body; use a new key"
        )
    return earlier.vm


def _new_vm(
    request: CreateVMRequest, guest: GuestConfig, expires_at: datetime | None, tenant: str
) -> VM:
    return VM(
        tenant=tenant,
        id=guest.instance_id,
        image=request.image,
        cpus=request.cpus,
        memory=request.memory,
        disk_size=request.disk_size,
        network_type=request.network_type,
        network_group=request.network_group,
        egress=request.egress,
        headless=request.headless,
        callback_url=request.callback_url,
        ready_when=request.ready_when,
        name=request.name,
        hostname=guest.hostname,
        ssh_authorized_keys=list(guest.ssh_authorized_keys),
        user_data_sha256=guest.user_data_sha256,
        metadata_keys=list(guest.metadata),
        start=request.start,
        on_poweroff=request.on_poweroff,
        labels=request.labels,
        expires_at=expires_at,
        created_at=now_s(),
        timeline=[TimelineEntry(phase=Phase.ACCEPTED, at=now())],
    )
