"""Files into and out of a guest as tar streams, made and taken by the guest's own ``tar``
through its helper (``guest.channel``): ``GET`` and ``PUT /vms/{id}/files``."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator

from goldclone.errors import ExecFailed, GuestPathNotFound, InvalidRequest
from goldclone.guest.channel import Channel, Exit, Session


def check_path(path: str) -> str:
    """``path`` as a guest path the files routes take: absolute, normalized, not ``/``."""
    if not path.startswith("/") or "\0" in path:
        raise InvalidRequest("path: must be an absolute path in the guest")
    return posixpath.normpath(path)


async def read_tree(channel: Channel, path: str) -> AsyncIterator[bytes]:
    """A tar of the file or folder at ``path`` (modes kept), its one top member named as
    ``path``'s last part. Raises ``GuestPathNotFound`` before the first byte."""
    path = check_path(path)
    if path == "/":
        raise InvalidRequest("path: name a file or folder below /")
    found = await channel.session({"argv": ["test", "-e", path]})
    if (await found.collect())[2].exit_code != 0:
        raise GuestPathNotFound(f"no file or folder {path} in the guest")
    parent, name = posixpath.split(path)
    session = await channel.session({"argv": ["tar", "-c", "-C", parent, "--", f"./{name}"]})
    return _stream(session, f"tar in the guest could not read {path}")


async def _stream(session: Session, failure: str) -> AsyncIterator[bytes]:
    """The session's stdout as it comes; a failure at its end breaks the stream off (the
    client sees a truncated answer, never a whole one)."""
    errors = bytearray()
    try:
        while not isinstance(item := await session.receive(), Exit):
            if item.stream == 1:
                yield item.data
            else:
                errors += item.data[: 4096 - len(errors)]
            await session.consumed(len(item.data))
        if item.exit_code != 0:
            raise ExecFailed(f"{failure}: {_last_line(errors)}")
    finally:
        await session.close()


async def write_tree(channel: Channel, folder: str, tar: AsyncIterator[bytes]) -> None:
    """Extract the tar stream ``tar`` into the guest's ``folder`` (which must exist), modes
    kept; ``InvalidRequest`` saying why when the guest's ``tar`` refuses it."""
    folder = check_path(folder)
    session = await channel.session({"argv": ["tar", "-x", "-C", folder, "-f", "-"]})
    try:
        try:
            async for chunk in tar:
                await session.write(chunk)
            await session.end_input()
        except ExecFailed:
            pass  # tar ended before it took it all: its exit says why
        _, errors, ended = await session.collect()
    finally:
        await session.close()
    if ended.exit_code != 0:
        said = ended.error or _last_line(errors)
        raise InvalidRequest(f"the archive was not extracted into {folder}: {said}")


def _last_line(text: bytes | bytearray) -> str:
    lines = bytes(text).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "it gave no reason"
