"""A gold image on disk: its read-only folder, and ``gold.json``, which says what it is (its
format, where it came from, its package's sha256, its disk and the disk's sha256)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goldclone.images.checks import DiskImage

log = logging.getLogger(__name__)

METADATA = "gold.json"
GOLD_FORMAT = 3
"""The format of ``gold.json``: 1 had no version (up to commit 8682a97); 2 says so; 3 adds
``disk_sha256``, the image's identity, and ``oci``, the registry reference it was pulled by."""


@dataclass(frozen=True)
class GoldImage:
    key: str
    """The gold image's ID, ``<type>-<checksum>``: the checksum it was first fetched by (a
    registry's image: its disk's sha256)."""
    root: Path
    disk: DiskImage
    vmx: Path | None


def content_of(key: str, meta: dict[str, Any]) -> str | None:
    """The sha256 of a gold image's package: in its ``gold.json``, or its ID; unknown for an
    image fetched by another checksum before gold images kept it."""
    kind, checksum = key.split("-", 1)
    content = meta.get("sha256") or (checksum if kind == "sha256" else None)
    return str(content) if content else None


def identity_of(meta: dict[str, Any]) -> str | None:
    """What a gold image is: its disk's sha256, the same whatever package or registry format
    carried the disk; none for a VMware VM, which is known by its package alone."""
    return None if meta.get("vmx") else meta.get("disk_sha256")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in large blocks (blocking)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_metadata(root: Path) -> dict[str, Any] | None:
    """A gold image's ``gold.json``; ``None`` unless the image is complete and of a format
    that this code reads."""
    try:
        meta: dict[str, Any] = json.loads((root / METADATA).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return meta if meta.get("version") == GOLD_FORMAT else None


def upgrade_metadata(root: Path) -> None:
    """Bring the ``gold.json`` of an image made by earlier code to ``GOLD_FORMAT``, in one
    rename, deriving what it lacks; one made by newer code is left alone."""
    try:
        meta: dict[str, Any] = json.loads((root / METADATA).read_text())
    except (OSError, ValueError):
        return
    version = meta.get("version", 1)
    if version == GOLD_FORMAT:
        return
    if not isinstance(version, int) or version > GOLD_FORMAT:
        log.warning("gold image %s is of format %s, newer than this code's; not used",
                    root.name, version)  # fmt: skip
        return
    # Format 1 (up to commit 8682a97): no version; before 2a3b13e, no url or size either.
    meta |= {"version": GOLD_FORMAT}
    meta.setdefault("url", "")
    meta.setdefault("size_bytes", disk_usage(root / "content"))
    # Format 2: no identity; the disk is read once to find it.
    meta.setdefault("oci", None)
    if "disk_sha256" not in meta:
        meta["disk_sha256"] = None if meta.get("vmx") else file_sha256(root / meta["disk"])
    partial = root / f".{METADATA}.new"
    os.chmod(root, 0o755)
    try:
        partial.write_text(json.dumps(meta))
        os.chmod(partial, 0o444)
        os.replace(partial, root / METADATA)
    finally:
        partial.unlink(missing_ok=True)
        os.chmod(root, 0o555)
    log.info("gold image %s: gold.json upgraded from format %d to %d",
             root.name, version, GOLD_FORMAT)  # fmt: skip


def disk_usage(root: Path) -> int:
    """The space the files under ``root`` take on disk, computed once when it is published."""
    return sum(
        os.lstat(os.path.join(folder, name)).st_blocks * 512
        for folder, _, files in os.walk(root)
        for name in files
    )


def make_writable(root: Path) -> None:
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def make_read_only(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        make_writable(path)  # a gold image's read-only folders stop a non-root owner
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
