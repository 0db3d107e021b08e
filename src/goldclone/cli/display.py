"""How the CLI shows VMs and images to people: tables, and live progress while waiting."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from goldclone.clock import now, rfc3339_ms, rfc3339_s, seconds_between
from goldclone.models import (
    VM,
    DownloadProgress,
    Host,
    Image,
    ImageStatus,
    Phase,
    Pool,
    Status,
    Template,
)


def vm_table(vms: list[VM]) -> Table:
    table = Table("ID", "NAME", "STATUS", "IP", "CPUS", "MEMORY", "NETWORK", "CREATED",
                  "EXPIRES", "LABELS", box=None)  # fmt: skip
    for vm in vms:
        status = f"{vm.status.value} ({vm.error.code})" if vm.error else vm.status.value
        labels = ",".join(f"{key}={value}" for key, value in sorted(vm.labels.items()))
        table.add_row(
            vm.id, vm.name or "-", status, vm.ip_address or "-", str(vm.cpus),
            f"{vm.memory} MB", vm.network_type, rfc3339_s(vm.created_at), expiry(vm),
            labels or "-",
        )  # fmt: skip
    return table


def image_table(images: list[Image]) -> Table:
    table = Table("ID", "STATUS", "SIZE", "VMS", "TEMPLATES", "URL", box=None)
    for image in images:
        status = f"{image.status.value} ({image.error.code})" if image.error else image.status
        shapes = ",".join(
            f"{t.cpus}x{t.memory}MB" + (f"x{t.disk_size}GiB" if t.disk_size else "")
            for t in image.templates
        )
        table.add_row(image.id, str(status), _size(image.size_bytes), str(image.vms),
                      shapes or "-", image.url or image.oci or "")  # fmt: skip
    return table


def template_table(templates: list[Template]) -> Table:
    table = Table("ID", "IMAGE", "CPUS", "MEMORY", "STATUS", "SIZE", "CREATED", box=None)
    for template in templates:
        status = template.status.value + (f" ({template.error.code})" if template.error else "")
        table.add_row(template.id, template.image_id, str(template.cpus),
                      f"{template.memory} MB", status, _size(template.size_bytes),
                      rfc3339_s(template.created_at))  # fmt: skip
    return table


def pool_table(pools: list[Pool]) -> Table:
    table = Table("NAME", "STATUS", "READY", "FILLING", "CLAIMED", "CPUS", "MEMORY", "IMAGE",
                  box=None)  # fmt: skip
    for pool in pools:
        status = pool.status.value + (f" ({pool.error.code})" if pool.error else "")
        table.add_row(pool.name, status, f"{pool.ready}/{pool.size}", str(pool.filling),
                      str(pool.claimed), str(pool.cpus), f"{pool.memory} MB",
                      pool.image.source)  # fmt: skip
    return table


def host_table(hosts: list[Host]) -> Table:
    table = Table("ID", "STATE", "VMS", "VCPUS", "MEMORY", "HEARTBEAT", "NAME", box=None)
    for host in hosts:
        used, capacity = host.used, host.capacity
        table.add_row(
            host.id, host.state.value, _of(used.vms, capacity.vms), _of(used.cpus, capacity.cpus),
            _of(used.memory, capacity.memory, " MB"), rfc3339_ms(host.heartbeat_at), host.name,
        )  # fmt: skip
    return table


def _of(used: int | None, total: int | None, unit: str = "") -> str:
    """``3/8`` (used of a total), or ``3`` where the host sets no total."""
    return f"{used}{unit}" if total is None else f"{used}/{total}{unit}"


def _size(n: int | None) -> str:
    size = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def expiry(vm: VM) -> str:
    """When ``vm``'s lease ends, or ``never``."""
    return rfc3339_s(vm.expires_at) if vm.expires_at else "never"


def vm_detail(vm: VM) -> RenderableType:
    """Everything about one VM, for ``goldclone get``: its fields, then its timeline with the
    time each phase took."""
    image = vm.image
    rows = [
        ("id", vm.id),
        ("name", vm.name or "-"),
        ("status", vm.status.value),
        ("error", f"{vm.error.code}: {vm.error.message}" if vm.error else None),
        ("ip address", vm.ip_address or "-"),
        ("mac address", vm.mac_address or "-"),
        ("hostname", vm.hostname or None),
        ("guest os", vm.guest_os or None),
        (
            "image",
            image.source + (f" ({image.checksum_type} {image.checksum})" if image.url else ""),
        ),
        ("image from", {True: "the cache", False: "a download", None: None}[vm.image_from_cache]),
        ("cpus", str(vm.cpus)),
        ("memory", f"{vm.memory} MB"),
        ("disk", f"{vm.disk_size} GiB" if vm.disk_size else "the image's size"),
        ("network", vm.network_type),
        ("started from", vm.started_from + (f" (pool {vm.pool})" if vm.pool else "")),
        ("ready when", vm.ready_when.model_dump_json(exclude_none=True) if vm.ready_when else None),
        ("callback", vm.callback_url),
        ("ssh keys", str(len(vm.ssh_authorized_keys)) if vm.ssh_authorized_keys else None),
        ("metadata", ", ".join(vm.metadata_keys) or None),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(vm.labels.items())) or None),
        ("created", rfc3339_s(vm.created_at)),
        ("expires", expiry(vm)),
        ("download", _progress(vm.progress) if vm.progress else None),
    ]
    shown = [(name, value) for name, value in rows if value is not None]
    width = max(len(name) for name, _ in shown)
    # plain lines, not a grid: a grid pads every line to its widest, here the image's
    fields = Text("\n".join(f"{name:<{width}}  {value}" for name, value in shown))
    timeline = Table("PHASE", "AT", "+", "TOOK", box=None, title_justify="left")
    entries = vm.timeline
    for entry, following in zip(entries, [*entries[1:], None], strict=True):
        since = seconds_between(entries[0].at, entry.at)
        took = seconds_between(entry.at, following.at) if following else None
        timeline.add_row(entry.phase.value, rfc3339_ms(entry.at), f"{since:.2f}s",
                         f"{took:.2f}s" if took is not None else "-")  # fmt: skip
    return Group(fields, Text(""), timeline)


def _progress(progress: DownloadProgress) -> str:
    done = _size(progress.bytes_done)
    return f"{done} of {_size(progress.bytes_total)}" if progress.bytes_total else done


class WaitDisplay:
    """Shows each phase of a VM's timeline as it happens, and a download as a progress bar.

    Use it as a context manager and feed it every fresh copy of the VM (``update``) or of an
    image (``update_image``), which has no timeline: its status changes are shown.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._shown: set[Phase] = set()
        self._start: datetime | None = None
        self._bar = Progress(
            TextColumn("  downloading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        # no redirection of stdout and stderr: a Ctrl-C while it starts would leave it in place
        self._live = Live(self._bar, console=console, transient=True, redirect_stdout=False,
                          redirect_stderr=False)  # fmt: skip

    def __enter__(self) -> WaitDisplay:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, vm: VM) -> None:
        progress = vm.progress if vm.status is Status.CREATING else None
        self._download(progress)  # a bar that ended goes before the phase that ended it shows
        for entry in vm.timeline:
            self._show(entry.phase, entry.at)

    def update_image(self, image: Image) -> None:
        self._download(image.progress if image.status is ImageStatus.DOWNLOADING else None)
        self._show(Phase(image.status.value), now())

    def _show(self, phase: Phase, at: datetime) -> None:
        # Phases are told apart by name, not by their place in the timeline: one seen live
        # (a download) may be missing from, or later in, a copy read afterwards.
        if phase in self._shown:
            return
        self._shown.add(phase)
        self._start = self._start or at
        elapsed = (at - self._start).total_seconds()
        mark = "[red]✗[/]" if phase is Phase.ERROR else "[green]✓[/]"
        self._console.print(f"{mark} {phase.value:<12} +{elapsed:.2f}s", highlight=False)

    def _download(self, progress: DownloadProgress | None) -> None:
        if progress is not None:
            if self._task is None:
                self._task = self._bar.add_task("download", total=progress.bytes_total)
            self._bar.update(self._task, completed=progress.bytes_done,
                             total=progress.bytes_total)  # fmt: skip
        elif self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
