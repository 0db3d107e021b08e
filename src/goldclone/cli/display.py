"""How the CLI shows VMs and images to people: tables, and live progress while waiting."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
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

from goldclone.models import VM, Image, Phase


def vm_table(vms: list[VM]) -> Table:
    table = Table("ID", "NAME", "STATUS", "IP", "CPUS", "MEMORY", "NETWORK", "CREATED",
                  "EXPIRES", "LABELS", box=None)  # fmt: skip
    for vm in vms:
        status = f"{vm.status.value} ({vm.error.code})" if vm.error else vm.status.value
        labels = ",".join(f"{key}={value}" for key, value in sorted(vm.labels.items()))
        table.add_row(
            vm.id, vm.name or "-", status, vm.ip_address or "-", str(vm.cpus),
            f"{vm.memory} MB", vm.network_type, vm.created_at, vm.expires_at or "never",
            labels or "-",
        )  # fmt: skip
    return table


def image_table(images: list[Image]) -> Table:
    table = Table("ID", "STATUS", "SIZE", "VMS", "URL", box=None)
    for image in images:
        status = f"{image.status.value} ({image.error.code})" if image.error else image.status
        table.add_row(image.id, str(status), _size(image.size_bytes), str(image.vms), image.url)
    return table


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


class WaitDisplay:
    """Shows each phase of a VM's timeline as it happens, and the download as a progress bar.

    Use it as a context manager and feed it every fresh copy of the VM through ``update``.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._seen = 0
        self._bar = Progress(
            TextColumn("  downloading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._live = Live(self._bar, console=console, transient=True)

    def __enter__(self) -> WaitDisplay:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, vm: VM) -> None:
        start = _at(vm.timeline[0].at)
        for entry in vm.timeline[self._seen :]:
            elapsed = (_at(entry.at) - start).total_seconds()
            mark = "[red]✗[/]" if entry.phase is Phase.ERROR else "[green]✓[/]"
            self._console.print(f"{mark} {entry.phase.value:<12} +{elapsed:.2f}s", highlight=False)
        self._seen = len(vm.timeline)
        if vm.progress is not None:
            if self._task is None:
                self._task = self._bar.add_task("download", total=vm.progress.bytes_total)
            self._bar.update(
                self._task, completed=vm.progress.bytes_done, total=vm.progress.bytes_total
            )
        elif self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
