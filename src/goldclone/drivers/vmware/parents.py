"""One parent VM per gold image (VMware's "template"; not a memory template), holding the one
snapshot that its linked clones come from.

vmrun needs a snapshot in the source of a linked clone, and without ``-snapshot`` it adds a
new one at every clone. It also writes into the source's folder: a snapshot changes the
``.vmx`` and adds a ``.vmsd``, a ``.vmsn`` and a delta disk, and each linked clone is recorded
in the ``.vmsd``. So the source is not the gold image itself, which stays read-only and byte
for byte as it was checked, but a template in the driver's own folder::

    vmware/templates/<image key>/template.vmx   the gold .vmx, its disks by absolute path
                                 template.vmsd  the snapshot, and the clones made from it
                                 gold.json      which gold image (path, inode, mtime) it is for

The snapshot's base disks are the gold's, which VMware only reads. The template is made, and
snapshotted, once per gold image under an asyncio lock and a file lock; a template whose gold
image was deleted is pruned at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from goldclone.drivers.vmware import clonevmx
from goldclone.drivers.vmware.vmrun import Vmrun
from goldclone.errors import CommandError
from goldclone.images.gold import GoldImage
from goldclone.polling import until

log = logging.getLogger(__name__)

_LOCK_POLL = 0.05
TEMPLATE_FORMAT = 2
"""2: the template's .vmx is confined to the gold image before VMware opens it."""
_IDENTITY = "gold.json"


class CloneParents:
    """The parent VM of each image's linked clones (VMware's term), under ``root``, snapshotted
    as ``snapshot`` through ``vmrun``; not the memory templates of ``service.templates``."""

    def __init__(self, root: Path, vmrun: Vmrun, snapshot: str) -> None:
        self._root = root
        self._vmrun = vmrun
        self.snapshot = snapshot
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: dict[str, dict[str, object]] = {}

    def vmx(self, key: str) -> Path:
        return self._root / key / "template.vmx"

    async def ensure(self, gold: GoldImage) -> Path:
        """The template of ``gold``, made and snapshotted unless it already is."""
        identity = _identity(gold)
        if self._ready.get(gold.key) != identity:
            self._root.mkdir(parents=True, exist_ok=True)
            lock = self._locks.setdefault(gold.key, asyncio.Lock())
            async with lock, _file_lock(self._root / f"{gold.key}.lock"):
                if self._ready.get(gold.key) != identity:
                    if not await self._usable(gold.key, identity):
                        await self._make(gold, identity)
                    self._ready[gold.key] = identity
        return self.vmx(gold.key)

    def prune(self) -> None:
        """Remove the templates whose gold image is gone."""
        for folder in self._root.glob("*/"):
            try:
                gold = Path(str(json.loads((folder / _IDENTITY).read_text())["gold"]))
            except (OSError, ValueError, KeyError):
                gold = None
            if gold is None or not gold.exists():
                log.info("removing the template %s: its gold image is gone", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                (self._root / f"{folder.name}.lock").unlink(missing_ok=True)

    async def _usable(self, key: str, identity: dict[str, object]) -> bool:
        vmx = self.vmx(key)
        try:
            recorded = json.loads((vmx.parent / _IDENTITY).read_text())
        except (OSError, ValueError):
            return False
        if recorded != identity:
            return False
        try:
            return self.snapshot in await self._vmrun.snapshots(vmx)
        except CommandError as exc:
            log.warning("template %s is unusable, making it again: %s", key, exc.message)
            return False

    async def _make(self, gold: GoldImage, identity: dict[str, object]) -> None:
        assert gold.vmx is not None
        folder = self.vmx(gold.key).parent
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            vmx = clonevmx.template(gold.vmx, gold.root)
            vmx.set("displayName", f"goldclone template {gold.key}")
            self.vmx(gold.key).write_bytes(vmx.to_bytes())
            await self._vmrun("snapshot", str(self.vmx(gold.key)), self.snapshot)
            (folder / _IDENTITY).write_text(json.dumps(identity))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("template of %s made, with the snapshot %r", gold.key, self.snapshot)


def _identity(gold: GoldImage) -> dict[str, object]:
    """What tells this gold image from one deleted and fetched again at the same path, and
    templates made by this code from those of earlier code, which are made again."""
    stat = gold.root.stat()
    return {"gold": str(gold.root), "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns,
            "format": TEMPLATE_FORMAT}  # fmt: skip


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path``, waited for without blocking the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await until(lambda: _try_lock(fd), interval=_LOCK_POLL)
        yield
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
