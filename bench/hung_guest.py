"""(e) A hung guest: GET and LIST while a running guest's QEMU is SIGSTOPped, and its DELETE.

One demo guest is booted, then its QEMU is stopped with SIGSTOP (by the PID in its pidfile),
so its QMP monitor never answers. GET /vms/{id} and GET /vms are each timed by the client,
one after another; then the DELETE, which must give up on the monitor (``system_powerdown``
and ``quit`` time out) and SIGKILL the stopped process. The server's shutdown timeout is 5 s,
as for every benchmark: a DELETE that waited it out would show.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

from bench._common import (
    Server,
    Stopwatch,
    demo_server,
    describe,
    scratch,
    start,
    verdict,
    wait_running,
)

TARGET_READ_MS = 500.0
TARGET_DELETE_S = 10.0


async def timed_get(server: Server, path: str) -> float:
    started = time.perf_counter()
    response = await server.client.get(path)
    response.raise_for_status()
    return time.perf_counter() - started


def exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (whose parent, not goldclone, reaps it)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


async def main(requests: int) -> None:
    with scratch() as work:
        async with demo_server(work) as (server, body):
            vm = await wait_running(server, (await server.post_vm(body))["id"])
            pid = int(Path(server.data_dir / "vms" / vm["id"] / "qemu.pid").read_text())
            os.kill(pid, signal.SIGSTOP)
            gets = [await timed_get(server, f"/vms/{vm['id']}") for _ in range(requests)]
            lists = [await timed_get(server, "/vms") for _ in range(requests)]
            with Stopwatch() as delete:
                await server.delete(vm["id"])
            killed = exited(pid)
    print(describe("GET /vms/{id}, its QEMU stopped", gets))
    print(describe("GET /vms, one QEMU stopped", lists))
    print(f"DELETE of the stopped guest: {delete.seconds:.2f} s; its QEMU is gone: {killed}")
    slowest = max(gets + lists) * 1000
    print()
    print(f"slowest GET or LIST: {slowest:.1f} ms   target < {TARGET_READ_MS:.0f} ms: "
          f"{verdict(slowest < TARGET_READ_MS)}")  # fmt: skip
    print(f"DELETE: {delete.seconds:.2f} s   target < {TARGET_DELETE_S:.0f} s: "
          f"{verdict(delete.seconds < TARGET_DELETE_S and killed)}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="GETs and LISTs, each")
    args = parser.parse_args()
    start("hung_guest: GET, LIST and DELETE while a guest's QEMU is SIGSTOPped")
    asyncio.run(main(args.requests))
