"""The create, get, list and delete cycle against a real vmrun, on a VMware host.

Run it (through ``scripts/vmware-smoke``) against a goldclone serving with the vmware driver on
a Fusion or Workstation host::

    GOLDCLONE_DRIVER=vmware .venv/bin/goldclone serve --data-dir /tmp/gc &
    scripts/vmware-smoke --image-url https://example.org/vm.tar.gz --checksum HEX \\
        --checksum-type sha256 --data-dir /tmp/gc

With ``--data-dir`` (the server's), it also asks vmrun itself whether the clone runs while the
VM is up and is gone after DELETE, and checks what goldclone wrote into the clone's ``.vmx``.
Each step prints ``ok`` or ``FAIL``; the exit status is 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from goldclone.client import APIError, AsyncClient, default_url
from goldclone.drivers.vmware import vmrun
from goldclone.host.commands import run
from goldclone.images.vmx import read_vmx
from goldclone.models import VM, CreateVMRequest, ImageSpec


class Smoke:
    def __init__(self) -> None:
        self.failures = 0

    async def step(self, name: str, check: Callable[[], Awaitable[str]]) -> None:
        """Run one step; print its outcome and time."""
        started = time.monotonic()
        try:
            detail = await check()
        except Exception as exc:
            self.failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            return
        print(f"ok   {name} ({time.monotonic() - started:.1f} s){': ' + detail if detail else ''}")


async def main(args: argparse.Namespace) -> int:
    smoke = Smoke()
    request = CreateVMRequest(
        image=ImageSpec(
            url=args.image_url, checksum=args.checksum, checksum_type=args.checksum_type
        ),
        cpus=args.cpus,
        memory=args.memory,
        network_type=args.network,
        headless=not args.gui,
    )
    cli = _vmrun(args.vmrun) if args.data_dir else None
    async with AsyncClient(args.url, timeout=60) as client:
        vm = await client.create(request)
        print(f"ok   POST /vms: {vm.id}")
        vmx = args.data_dir / "vms" / vm.id / f"{vm.id}.vmx" if args.data_dir else None

        async def running() -> str:
            nonlocal vm
            vm = await client.wait_until_running(vm.id, timeout=args.timeout)
            return f"{vm.ip_address}, MAC {vm.mac_address}"

        async def got() -> str:
            assert (await client.get(vm.id)) == vm, "GET differs from the running VM"
            return ""

        async def listed() -> str:
            assert vm.id in [v.id for v in await client.list_vms()], "not in GET /vms"
            return ""

        async def deleted() -> str:
            await client.delete(vm.id)
            try:
                await client.get(vm.id)
            except APIError as exc:
                assert exc.status == 404, exc
                return ""
            raise AssertionError("GET still finds the VM after DELETE")

        await smoke.step("the VM runs with an IP", running)
        await smoke.step("GET /vms/{id}", got)
        await smoke.step("GET /vms", listed)
        if cli is not None and vmx is not None:
            await smoke.step("vmrun list shows the clone", lambda: _listed(cli, vmx, True))
            await smoke.step("the clone's .vmx", lambda: _configured(vmx, vm, request))
        await smoke.step("DELETE /vms/{id}", deleted)
        if cli is not None and vmx is not None:
            await smoke.step("vmrun list no more", lambda: _listed(cli, vmx, False))
            await smoke.step("the clone's folder is gone", lambda: _gone(vmx.parent))
    print("all steps passed" if not smoke.failures else f"{smoke.failures} step(s) failed")
    return 1 if smoke.failures else 0


def _vmrun(configured: str | None) -> vmrun.Vmrun:
    path = vmrun.locate(configured)
    return vmrun.Vmrun(path, vmrun.host_type("auto", path), 60)


async def _listed(cli: vmrun.Vmrun, vmx: Path, expected: bool) -> str:
    assert (str(vmx.resolve()) in await cli.running()) == expected, await _list_text(cli)
    return ""


async def _list_text(cli: vmrun.Vmrun) -> str:
    _, out, _ = await run(cli.path, "-T", cli.host_type, "list", check=False)
    return out.strip()


async def _configured(vmx: Path, vm: VM, request: CreateVMRequest) -> str:
    config = read_vmx(vmx)
    expected = {
        "numvcpus": str(request.cpus),
        "memsize": str(request.memory),
        "ethernet0.connectionType": request.network_type,
        "ethernet0.address": vm.mac_address,
        "displayName": f"goldclone-{vm.id}",
    }
    actual = {key: config.get(key) for key in expected}
    assert actual == expected, f"expected {expected}, found {actual}"
    return ", ".join(f"{key}={value}" for key, value in actual.items())


async def _gone(folder: Path) -> str:
    assert not folder.exists(), f"{folder} is still there: {sorted(folder.iterdir())}"
    return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=default_url(), help="the goldclone server")
    parser.add_argument("--image-url", required=True, help="a VMware VM package")
    parser.add_argument("--checksum", required=True)
    parser.add_argument("--checksum-type", default="sha256")
    parser.add_argument("--network", default="nat", choices=["nat", "hostonly", "bridged"])
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--gui", action="store_true", help="start the VM with a window")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for it")
    parser.add_argument("--data-dir", type=Path, help="the server's data dir, for vmrun checks")
    parser.add_argument("--vmrun", help="vmrun's path (default: as the server finds it)")
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_parser().parse_args())))
