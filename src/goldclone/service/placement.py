"""Which host a new VM goes to: one whose per-VM bounds take it (CPUs, memory, network type,
probe) and with room for it within the totals it offers, preferring, in this order, a host
with a ready machine of a matching warm pool, one with a ready memory template of the image in
the VM's shape, and one that holds the gold image; then, by ``GOLDCLONE_PLACEMENT``, the host
with the fewest VMs (``spread``) or the most (``pack``); then the host that received the
request, which has nothing to hand over.

A host with a ready pool machine takes the VM whether or not it has room: the machine already
holds what the VM will.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from goldclone.errors import CapacityExceeded, ImageNotFound, InvalidRequest
from goldclone.settings import PlacementPolicy
from goldclone.store.host_records import Candidate, Held

_TOTALS = (("vms", "VMs"), ("cpus", "vCPUs"), ("memory", "MB of memory"))


def chooser(
    policy: PlacementPolicy,
    wanted: Held,
    refusal: Callable[[Mapping[str, Any]], str | None],
    receiver: str,
    image_id: str | None = None,
) -> Callable[[list[Candidate]], Candidate]:
    """What chooses the host for a VM of shape ``wanted`` among the candidates, for a request
    that ``receiver`` (a host ID) received; ``refusal`` tells why a host of given per-VM
    bounds would never take it (``InvalidRequest`` if no host would). An image named by its
    ``image_id`` comes from nowhere: only a host that holds it may take the VM
    (``ImageNotFound`` if none does)."""
    lean = 1 if policy == "pack" else -1

    def choose(candidates: list[Candidate]) -> Candidate:
        # a host of a release before bounds were offered checks the request once it takes it
        refused = {c.host_id: refusal(c.host["bounds"]) if "bounds" in c.host else None
                   for c in candidates}  # fmt: skip
        offering = [c for c in candidates if refused[c.host_id] is None]
        if image_id is not None:
            if not (holding := [c for c in candidates if c.holds_image]):
                raise ImageNotFound(f"there is no image {image_id}", image=image_id)
            offering = [c for c in offering if c in holding]
        if not offering:
            raise InvalidRequest(_not_taken(refused, receiver))
        if wanted.group is not None:  # a group's VMs reach each other on one host's bridge
            members = [c for c in candidates if any(h.group == wanted.group for h in c.held)]
            if members:
                offering = [c for c in offering if c in members]
                if not offering:
                    raise InvalidRequest(
                        f"network_group: its VMs are on {members[0].host_id}, which does "
                        f"not take this VM: {refused[members[0].host_id]}"
                    )
        refusals = {c.host_id: full(c.host["capacity"], c.held, wanted) for c in offering}
        fitting = [c for c in offering if c.pooled or refusals[c.host_id] is None]
        if not fitting:
            raise CapacityExceeded(_no_room(refusals, receiver))
        return max(
            fitting,
            key=lambda c: (c.pooled, c.templated, c.holds_image, lean * len(c.held),
                           c.host_id == receiver),
        )  # fmt: skip

    return choose


def full(capacity: dict[str, Any], held: list[Held], wanted: Held) -> str | None:
    """Why a host with the totals ``capacity`` (``{"vms", "cpus", "memory"}``, ``None`` for
    no total) that holds ``held`` has no room for ``wanted``; ``None`` if it has."""
    used = {"vms": len(held), "cpus": sum(h.cpus for h in held),
            "memory": sum(h.memory for h in held)}  # fmt: skip
    asked = {"vms": 1, "cpus": wanted.cpus, "memory": wanted.memory}
    for part, name in _TOTALS:
        total = capacity.get(part)
        if total is not None and used[part] + asked[part] > total:
            return (
                f"allows {total} {name} in all; {used[part]} are in use (VMs and warm pools) "
                f"and this VM needs {asked[part]}"
            )
    return None


def _not_taken(refused: dict[str, str | None], receiver: str) -> str:
    if list(refused) == [receiver]:
        return f"{refused[receiver]} on this host"
    if not refused:
        return "no host is up to take this VM"
    return "no host that is up takes this VM: " + "; ".join(
        f"{reason} on {host}" for host, reason in refused.items()
    )


def _no_room(refusals: dict[str, str | None], receiver: str) -> str:
    if list(refusals) == [receiver]:
        return f"this host {refusals[receiver]}"
    reasons = "; ".join(f"{host} {reason}" for host, reason in refusals.items())
    return f"no host has room for this VM: {reasons}"
