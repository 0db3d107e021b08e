"""The thread that hashes and writes an unpacked file: what it is given lands whole and in
order (whole chunks of zeros as holes), and a failure on either side ends both, raised where
the unpacking can see it."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from goldclone.images.unpack.sink import DEPTH, Sink

CHUNK = 4096
ZEROS = bytes(CHUNK)


def test_the_file_is_written_in_order_and_hashed_with_holes_for_zeros(tmp_path: Path) -> None:
    chunks = [os.urandom(CHUNK), ZEROS, os.urandom(CHUNK), ZEROS, ZEROS]
    digest = hashlib.sha256()
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with Sink(fd, digest, ZEROS) as sink:
            for chunk in chunks:
                sink.put(chunk)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(chunks)
    assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert path.stat().st_blocks * 512 < len(b"".join(chunks))  # the zeros are holes


def test_a_write_that_fails_is_raised_to_the_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "read-only"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError), Sink(fd, None, ZEROS) as sink:
            for _ in range(4 * DEPTH):  # never blocks on a writer that stopped
                sink.put(os.urandom(CHUNK))
    finally:
        os.close(fd)


def test_an_unpacking_that_fails_ends_the_writer(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    before = threading.active_count()
    try:
        with pytest.raises(ValueError, match="damaged"), Sink(fd, None, ZEROS) as sink:
            sink.put(os.urandom(CHUNK))
            raise ValueError("the layer is damaged")
    finally:
        os.close(fd)
    assert threading.active_count() == before
