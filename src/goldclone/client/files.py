"""Files and folders to and from a guest, as the tar streams of ``/vms/{id}/files``: packed
here, and unpacked here only within the place asked for (the guest is not trusted: a tar it
sends that reaches elsewhere, or holds links or devices, is refused whole)."""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from goldclone.client.errors import Failed

SPOOL_BYTES = 8 << 20


class UnsafeArchive(Failed):
    """A tar from the guest that would write outside the place asked for (``unsafe-archive``)."""

    def __init__(self, message: str) -> None:
        super().__init__("unsafe-archive", message)


def guest_target(remote: str, local: Path) -> tuple[str, str]:
    """Where ``local`` goes for ``cp LOCAL ID:REMOTE``: the guest folder to extract into, and
    the name it takes there (``REMOTE``'s last part, or ``local``'s own name when ``REMOTE``
    ends with ``/``)."""
    if not remote.startswith("/"):
        raise ValueError(f"{remote}: the guest path must be absolute")
    if remote.endswith("/"):
        return posixpath.normpath(remote), local.name
    folder, name = posixpath.split(posixpath.normpath(remote))
    if not name:
        raise ValueError(f"{remote}: name a file or folder below /")
    return folder, name


def pack(local: Path, name: str) -> IO[bytes]:
    """``local`` (a file or a folder, with its modes) as a tar whose top member is
    ``name``, in a temporary file read from its start."""
    if not local.exists():
        raise ValueError(f"{local}: no such file or folder")
    spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115  the caller closes it
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(local, arcname=name)
    spool.seek(0)
    return spool


def unpack(chunks: Iterator[bytes], name: str, local: Path) -> Path:
    """Write the tar in ``chunks``, whose one top member is ``name``, to ``local`` (inside
    it, if it is a folder that exists). Nothing is written unless all of it is safe: it is
    unpacked in a new folder beside the target, then moved into place."""
    target = local / name if local.is_dir() else local
    if not target.parent.is_dir():
        raise ValueError(f"{target.parent}: no such folder")
    with tempfile.TemporaryDirectory(prefix=".goldclone-cp-", dir=target.parent) as staging:
        with tempfile.TemporaryFile() as spool:
            for chunk in chunks:
                spool.write(chunk)
            spool.seek(0)
            with tarfile.open(fileobj=spool, mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    _check(member, name)
                tar.extractall(staging, members=members, filter="tar")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(Path(staging) / name, target)
    return target


def _check(member: tarfile.TarInfo, name: str) -> None:
    path = posixpath.normpath(member.name.removeprefix("./"))
    inside = path == name or path.startswith(name + "/")
    if not inside or member.islnk() or member.issym() or not (member.isfile() or member.isdir()):
        raise UnsafeArchive(
            f"the guest sent {member.name!r}, which is not a plain file or folder within "
            f"{name}: nothing was written"
        )
