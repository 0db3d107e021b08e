"""The service's Prometheus metrics (``GET /metrics``), with the official ``prometheus-client``
in a registry of the service's own (so two services in one process never share counts).

Counters and histograms are updated as things happen: each phase of a VM's creation when the
next one begins, POST-to-running, callback deliveries, HTTP requests. Gauges (VMs by status,
the gold cache, capacity) are read from the store and the cache at each scrape.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)

from goldclone.clock import seconds_between
from goldclone.models import VM, Image, ImageStatus, Phase, Status
from goldclone.service.catalog import cache_bytes
from goldclone.settings import Limits
from goldclone.store.host_records import Held

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_TIMED = frozenset(Phase) - {Phase.RUNNING, Phase.ERROR, Phase.STOPPED, Phase.DELETING,
                             Phase.EXPIRED}  # fmt: skip
"""The phases of a creation, each timed until the next begins."""


class Metrics:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.registry = registry = CollectorRegistry()
        self._vms = Gauge("goldclone_vms", "VMs by status.", ["status"], registry=registry)
        self._phase = Histogram(
            "goldclone_vm_phase_seconds",
            "How long each phase of a VM's creation took, until the next began (downloading "
            "includes unpacking; booting and restoring include finding the IP).",
            ["phase"], buckets=_BUCKETS, registry=registry,
        )  # fmt: skip
        self._start = Histogram(
            "goldclone_vm_start_seconds",
            "From POST /vms (accepted) to running, by how the machine started.",
            ["started_from"], buckets=_BUCKETS, registry=registry,
        )  # fmt: skip
        self._gold_bytes = Gauge(
            "goldclone_gold_cache_bytes", "Bytes of the ready gold images and their templates.",
            registry=registry,
        )  # fmt: skip
        self._images = Gauge(
            "goldclone_gold_images", "Gold images by status.", ["status"], registry=registry
        )
        self._callbacks = Counter(
            "goldclone_callback_deliveries",
            "Callback deliveries that ended, by outcome (delivered; failed: out of attempts; "
            "gone: the receiver answered 410).",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self._used = Gauge(
            "goldclone_capacity_used",
            "What VMs and warm pools hold: vms, vcpus, memory_mb.", ["resource"],
            registry=registry,
        )  # fmt: skip
        self._free = Gauge(
            "goldclone_capacity_free",
            "What is left of the host's configured totals (only those that are configured).",
            ["resource"], registry=registry,
        )  # fmt: skip
        self._dropped = Gauge(
            "goldclone_network_dropped_packets",
            "Packets from guests that the network rules of this host dropped, by reason, since "
            "the rules were last written whole (at a network's start or repair).",
            ["reason"], registry=registry,
        )  # fmt: skip
        self._requests = Counter(
            "goldclone_http_requests", "HTTP requests by method, route and status.",
            ["method", "route", "status"], registry=registry,
        )  # fmt: skip

    def phase_added(self, vm: VM) -> None:
        """Time the phase that ``vm``'s newest phase ended, and the whole start once it runs."""
        if len(vm.timeline) < 2:
            return
        before, last = vm.timeline[-2], vm.timeline[-1]
        if before.phase in _TIMED:
            self._phase.labels(before.phase.value).observe(_seconds(before.at, last.at))
        if last.phase is Phase.RUNNING:
            started = _seconds(vm.timeline[0].at, last.at)
            self._start.labels(vm.started_from).observe(started)

    def delivered(self, outcome: str) -> None:
        self._callbacks.labels(outcome).inc()

    def request(self, method: str, route: str, status: int) -> None:
        self._requests.labels(method, route, str(status)).inc()

    def text(
        self,
        vms: Iterable[VM],
        images: Iterable[Image],
        held: list[Held],
        dropped: Mapping[str, int] | None = None,
    ) -> bytes:
        """The exposition of every metric, the gauges read from what is given."""
        for reason, packets in (dropped or {}).items():
            self._dropped.labels(reason).set(packets)
        by_status = Tally(vm.status for vm in vms)
        for status in Status:
            self._vms.labels(status.value).set(by_status[status])
        images = list(images)
        self._gold_bytes.set(cache_bytes(images))
        image_statuses = Tally(image.status for image in images)
        for image_status in ImageStatus:
            self._images.labels(image_status.value).set(image_statuses[image_status])
        used = {"vms": len(held), "vcpus": sum(h.cpus for h in held),
                "memory_mb": sum(h.memory for h in held)}  # fmt: skip
        totals = {"vms": self._limits.max_vms, "vcpus": self._limits.total_cpus,
                  "memory_mb": self._limits.total_memory_mb}  # fmt: skip
        for resource, amount in used.items():
            self._used.labels(resource).set(amount)
            if (total := totals[resource]) is not None:
                self._free.labels(resource).set(max(0, total - amount))
        return generate_latest(self.registry)


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, seconds_between(start, end))
