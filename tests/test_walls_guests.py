"""The walls around real QEMU guests: a demo guest's user-data script attacks its neighbour,
its host and what lies behind the host, and the legitimate paths still work. The same attacks
from fake guests, one by one and with both settings of bridge netfilter, are in
``test_walls.py``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goldclone.host.commands import run
from goldclone.polling import until
from goldclone.settings import Settings
from tests.conftest import checksum
from tests.harness import goldclone_server
from tests.netns import UPSTREAM, http_server, upstream
from tests.servers import FileServer

pytestmark = pytest.mark.root

HOST = "192.168.123.1"  # the default nat bridge's address
ALLOWED_PORT, CLOSED_PORT = 3142, 8765
# Each probe runs in the background; the page is written whole once all have answered.
ATTACKS = """#!/bin/sh
(
while ! ip -4 addr show dev eth0 | grep -q inet; do sleep 0.1; done
probe() {{
  if echo | nc -w 5 "$2" "$3" >/dev/null 2>&1; then a=yes; else a=no; fi
  echo "$1 $a" > "/tmp/probe.$1"
}}
probe peer {peer} 80 &
probe host-closed {host} {closed} &
probe host-other-address 192.0.2.1 {closed} &
probe lan {lan} 80 &
probe metadata {metadata} 80 &
probe host-allowed {host} {allowed} &
probe internet {internet} 80 &
wait
ip addr add {peer}/32 dev eth0
arping -U -c 3 -w 1 -I eth0 -s {peer} {peer}
cat /tmp/probe.* > /www/probes.tmp && mv /www/probes.tmp /www/probes.txt
) > /dev/null 2>&1 &
"""


@pytest.fixture
def walled(settings: Settings) -> Settings:
    network = dataclasses.replace(settings.network, guest_host_ports=(ALLOWED_PORT,))
    return dataclasses.replace(settings, network=network)


@pytest.fixture
async def served_world(tmp_path: Path) -> AsyncIterator[str]:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "index.html").write_text("served\n")
    async with (
        upstream(folder) as ns,
        http_server(folder, f"0.0.0.0:{ALLOWED_PORT}"),
        http_server(folder, f"0.0.0.0:{CLOSED_PORT}"),
    ):
        yield ns


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


async def test_a_guest_reaches_the_internet_and_an_allowed_host_port_and_nothing_else(
    walled: Settings, served_world: str, file_server: FileServer, demo_package: Path
) -> None:
    image = {"url": file_server.url(demo_package.name), "checksum": checksum(demo_package)}
    body: dict[str, Any] = {"image": image, "cpus": 1, "memory": 256}
    async with goldclone_server(walled) as goldclone:
        victim = await goldclone.boot(body)
        assert victim["status"] == "running", victim
        script = ATTACKS.format(peer=victim["ip_address"], host=HOST, closed=CLOSED_PORT,
                                allowed=ALLOWED_PORT, **UPSTREAM)  # fmt: skip
        attacker = await goldclone.boot({**body, "user_data": script})
        assert attacker["status"] == "running", attacker

        async def probes() -> str | None:
            page = await fetch(f"http://{attacker['ip_address']}/probes.txt")  # host to guest
            return page.text if page.status_code == 200 else None

        found = await until(probes, interval=0.5, timeout=120)
        assert dict(line.split() for line in found.splitlines()) == {
            "peer": "no", "host-closed": "no", "host-other-address": "no", "lan": "no",
            "metadata": "no", "host-allowed": "yes", "internet": "yes",
        }  # fmt: skip

        # the attacker now holds the victim's address and has announced it: the host still
        # finds the victim there, even after it forgets what it knew
        await run("ip", "neigh", "flush", "dev", walled.network.nat_bridge, timeout=10)
        page = await fetch(f"http://{victim['ip_address']}/")
        assert f" {victim['mac_address']} {victim['ip_address']}" in page.text

        async def counted() -> dict[str, int] | None:
            vm = await goldclone.client.get(f"/vms/{attacker['id']}")
            dropped: dict[str, int] = vm.json()["dropped_packets"]
            return dropped if dropped.get("arp", 0) >= 3 and dropped.get("peer", 0) else None

        dropped = await until(counted, interval=0.5, timeout=30)
        assert set(dropped) >= {"arp", "peer", "mac", "ip", "dhcp-server", "protocol"}
        metrics = (await goldclone.client.get("/metrics")).text
        assert 'goldclone_network_dropped_packets{reason="egress"}' in metrics
        [entry] = json.loads(
            (await run("ip", "-j", "neigh", "show", victim["ip_address"], timeout=10))[1]
        )
        assert entry["lladdr"] == victim["mac_address"]
