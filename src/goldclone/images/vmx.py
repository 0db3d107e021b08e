"""Read and edit VMware ``.vmx`` files, changing nothing but what you change.

A ``.vmx`` file is lines of ``key = "value"``. This module keeps every line as its bytes:
comments, blank lines, lines it cannot parse, key case, spacing and line endings all come
back unchanged from ``to_bytes``, and only the lines that ``set`` or ``delete`` touch are
rewritten. Keys are matched case-insensitively, as VMware does.

Values are text in the file's ``.encoding`` (UTF-8 when absent or unknown). VMware writes
a byte that can't stand in a quoted value as ``|`` and two hex digits (``|22`` for ``"``,
``|0A`` for a newline); ``get`` decodes these and ``set`` writes them.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VmxFile", "read_vmx"]

_ENTRY = re.compile(
    rb'(?P<head>(?:\xef\xbb\xbf)?[ \t]*(?P<key>[^\s=#"]+)[ \t]*=[ \t]*)'
    rb"(?P<value>.*?)(?P<tail>[ \t]*)",
    re.DOTALL,
)
_KEY = re.compile(r"[!$-<>-~]+")  # printable ASCII, but no quote, hash or equals sign
_ESCAPE = re.compile(rb'["|\x00-\x1f\x7f]')
_UNESCAPE = re.compile(rb"\|([0-9A-Fa-f]{2})")
_DEFAULT_ENCODING = "utf-8"


@dataclass
class _Line:
    content: bytes  # without its line ending
    ending: bytes
    key: str | None = None  # set for a key = value line
    head: bytes = b""  # what comes before the value, e.g. b'memsize = '
    value: bytes = b""  # the value as written, without quotes
    tail: bytes = b""  # what follows the value and its closing quote, e.g. spaces


class VmxFile:
    """The lines of a ``.vmx`` file, editable by key. ``VmxFile()`` is an empty file."""

    def __init__(self) -> None:
        self._lines: list[_Line] = []

    @classmethod
    def parse(cls, data: bytes) -> VmxFile:
        """Parse the bytes of a ``.vmx`` file. Never fails: odd lines are kept as they are."""
        vmx = cls()
        vmx._lines = [_parse_line(line) for line in data.splitlines(keepends=True)]
        return vmx

    def to_bytes(self) -> bytes:
        """Return the file's bytes: the original ones, except for the lines changed."""
        return b"".join(line.content + line.ending for line in self._lines)

    def get(self, key: str) -> str | None:
        """Return the value of ``key`` (any case), unquoted and unescaped, or ``None``.

        If the key appears more than once, the last one counts.
        """
        found = [line for line in self._lines if _same(line.key, key)]
        if not found:
            return None
        raw = _UNESCAPE.sub(lambda m: bytes([int(m[1], 16)]), found[-1].value)
        return raw.decode(self._encoding(), "surrogateescape")

    def set(self, key: str, value: str) -> None:
        """Set ``key`` to ``value``: on every line that has the key, or on a new last line.

        A new line ends like the file's other lines. Raises ``ValueError`` for a key that
        is not printable ASCII without ``"``, ``#`` or ``=``, or for a value that the file's
        encoding cannot hold.
        """
        if not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a valid .vmx key")
        encoded = value.encode(self._encoding(), "surrogateescape")
        escaped = _ESCAPE.sub(lambda m: b"|%02X" % m[0][0], encoded)
        found = [line for line in self._lines if _same(line.key, key)]
        for line in found:
            line.content = line.head + b'"' + escaped + b'"' + line.tail
            line.value = escaped
        if not found:
            self._append(key.encode("ascii") + b' = "' + escaped + b'"')

    def delete(self, key: str) -> None:
        """Remove every line that sets ``key``; a missing key is no error."""
        self._lines = [line for line in self._lines if not _same(line.key, key)]

    def keys(self) -> list[str]:
        """Return the keys in file order, each once, as first written."""
        seen: dict[str, str] = {}
        for line in self._lines:
            if line.key is not None:
                seen.setdefault(line.key.lower(), line.key)
        return list(seen.values())

    def __iter__(self) -> Iterator[str]:
        """Iterate over ``keys()``."""
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        """Whether some line sets ``key`` (any case)."""
        return isinstance(key, str) and any(_same(line.key, key) for line in self._lines)

    def _encoding(self) -> str:
        found = [line for line in self._lines if _same(line.key, ".encoding")]
        if not found:
            return _DEFAULT_ENCODING
        name = found[-1].value.decode("ascii", "replace")
        try:
            return codecs.lookup(name).name
        except LookupError:
            return _DEFAULT_ENCODING

    def _append(self, content: bytes) -> None:
        ending = next((line.ending for line in self._lines if line.ending), b"\n")
        if self._lines and not self._lines[-1].ending:
            self._lines[-1].ending = ending
        self._lines.append(_parse_line(content + ending))


def read_vmx(path: Path) -> VmxFile:
    """Read and parse the ``.vmx`` file at ``path``."""
    return VmxFile.parse(path.read_bytes())


def _same(line_key: str | None, key: str) -> bool:
    return line_key is not None and line_key.lower() == key.lower()


def _parse_line(raw: bytes) -> _Line:
    content = raw.rstrip(b"\r\n")
    line = _Line(content, raw[len(content) :])
    match = _ENTRY.fullmatch(content)
    if match is None:
        return line
    value, tail = match["value"], match["tail"]
    if value.startswith(b'"'):
        close = value.rfind(b'"')
        if close == 0:
            return line  # an unterminated quote: keep the line, but it sets nothing
        value, tail = value[1:close], value[close + 1 :] + tail
    line.head, line.tail = match["head"], tail
    line.key = match["key"].decode("utf-8", "surrogateescape")
    line.value = value
    return line
