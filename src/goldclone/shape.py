"""A machine's shape: what a VM, a memory template and a warm pool's machines are made with.
A VM may start from a template or a pool only of its own image and shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

GIB = 1 << 30


class Shaped(Protocol):
    @property
    def cpus(self) -> int: ...
    @property
    def memory(self) -> int: ...
    @property
    def disk_size(self) -> int | None: ...


@dataclass(frozen=True)
class Shape:
    cpus: int
    memory: int
    """Megabytes."""
    disk_size: int | None = None
    """GiB; ``None``: the image's own size."""

    @classmethod
    def of(cls, shaped: Shaped) -> Shape:
        return cls(shaped.cpus, shaped.memory, shaped.disk_size)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk_size is None else self.disk_size * GIB

    def describe(self) -> str:
        disk = "" if self.disk_size is None else f", a {self.disk_size} GiB disk"
        return f"{self.cpus} CPU(s), {self.memory} MB{disk}"
