"""The DHCP server of an owned network: one daemonized dnsmasq, known by its pid file.

dnsmasq daemonizes, so it outlives a restart of the service and running guests keep their
leases. It is found again through its pid file and trusted only when ``/proc/PID/cmdline`` is
exactly the command line this configuration would start. It is signalled by PID, never by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from goldclone.drivers.qemu.network import dnsmasq_leases
from goldclone.errors import CommandError, NetworkFailed
from goldclone.host import processes
from goldclone.host.commands import run
from goldclone.host.files import write_atomically
from goldclone.polling import until

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
RELEASE_TIMEOUT = 2.0
POLL = 0.05


def _drop_lines(path: Path, mac: str) -> bool:
    """Remove the lines of ``path`` that mention ``mac``; return whether there were any."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return False
    kept = [line for line in lines if mac.lower() not in line.lower()]
    if len(kept) == len(lines):
        return False
    path.write_text("".join(kept))
    return True


class Dnsmasq:
    """The dnsmasq serving DHCP on ``bridge`` for ``subnet``, with its files in ``state_dir``.

    ``router`` says whether guests are told to route through the host.
    """

    def __init__(
        self, bridge: str, subnet: IPv4Network, state_dir: Path, hosts_dir: Path, *, router: bool
    ) -> None:
        self.bridge = bridge
        self.subnet = subnet
        self.state_dir = state_dir
        self.router = router
        self.pid_file = state_dir / "dnsmasq.pid"
        self.index_file = state_dir / "bridge.index"
        self.lease_file = state_dir / "leases"
        self.hosts_dir = hosts_dir
        """One file per guest, named by its MAC, fixing its address: dnsmasq reads a new one
        at once (inotify), and hands out no address that no file names. It reads them as the
        unprivileged user it drops to, so the folder is not in the data dir, which that user
        may not be able to enter."""

    def argv(self) -> list[str]:
        """Return the exact command line that starts this server."""
        argv = [
            "dnsmasq",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            f"--interface={self.bridge}",
            "--except-interface=lo",
            f"--dhcp-range={self.subnet.network_address},static,{self.subnet.netmask},12h",
            f"--dhcp-leasefile={self.lease_file}",
            "--dhcp-authoritative",
            "--no-ping",
            f"--pid-file={self.pid_file}",
            f"--dhcp-hostsdir={self.hosts_dir}",
        ]
        # DNS on the bridge address: the host's /etc/hosts, and, for a network with a route
        # out, the host's resolvers; plain names and private reverse lookups stay here.
        argv += ["--domain-needed", "--bogus-priv"]
        if not self.router:
            argv.append("--dhcp-option=3")  # an empty router option: no default route via us
            argv.append("--no-resolv")  # no way out, so no names from outside
        return argv

    def _pid_from_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def owned_pid(self) -> int | None:
        """Return the PID of a live dnsmasq that uses our pid file, whatever its other options."""
        pid = self._pid_from_file()
        if pid is None:
            return None
        cmdline = processes.argv(pid)
        if not cmdline or os.path.basename(cmdline[0]) != "dnsmasq":
            return None
        return pid if f"--pid-file={self.pid_file}" in cmdline else None

    def adoptable_pid(self, index: int) -> int | None:
        """Return the PID of a running dnsmasq started with exactly this configuration, on the
        bridge whose link index is ``index``: a dnsmasq started on a bridge that has since been
        deleted and made again serves nothing, though its command line is the same."""
        pid = self.owned_pid()
        if pid is None or processes.argv(pid) != self.argv():
            return None
        try:
            served = int(self.index_file.read_text())
        except FileNotFoundError:
            return pid  # started by a release that did not record it: trusted as before
        except ValueError:
            return None
        return pid if served == index else None

    async def start(self, index: int) -> int:
        """Return the PID of this server on the bridge with link index ``index``, adopting a
        matching one or starting a new one.

        A dnsmasq on our pid file with another configuration or bridge is stopped first.
        """
        pid = self.adoptable_pid(index)
        if pid is not None:
            log.info("adopting dnsmasq %d on %s", pid, self.bridge)
            self.index_file.write_text(str(index))
            return pid
        await self.stop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        try:
            await run(*self.argv(), timeout=START_TIMEOUT)
        except CommandError as e:
            raise NetworkFailed(f"could not start dnsmasq on {self.bridge}: {e.message}") from e
        self.index_file.write_text(str(index))
        pid = self.adoptable_pid(index)
        if pid is None:
            raise NetworkFailed(f"dnsmasq on {self.bridge} exited at start")
        log.info("started dnsmasq %d on %s", pid, self.bridge)
        return pid

    async def stop(self) -> None:
        """Stop our dnsmasq, if one runs: SIGTERM, then SIGKILL when it does not exit in time."""
        pid = self.owned_pid()
        if pid is None:
            return
        if not await processes.end(pid, (signal.SIGTERM, signal.SIGKILL), STOP_TIMEOUT):
            raise NetworkFailed(f"dnsmasq {pid} on {self.bridge} did not exit after SIGKILL")
        log.info("stopped dnsmasq %d on %s", pid, self.bridge)

    def _host_file(self, mac: str) -> Path:
        return self.hosts_dir / mac.lower().replace(":", "-")

    def fix(self, mac: str, ip: IPv4Address) -> None:
        """Make ``ip`` the only address that ``mac`` is given."""
        self.hosts_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        # dnsmasq skips the temporary dotfile and reads the renamed one whole
        write_atomically(self._host_file(mac), f"{mac.lower()},{ip}\n".encode(), 0o644)

    def fixed(self) -> dict[str, IPv4Address]:
        """Each MAC with a fixed address, and that address."""
        found = {}
        for path in self.hosts_dir.glob("*"):
            with contextlib.suppress(OSError, ValueError):
                mac, ip = path.read_text().strip().split(",")
                found[mac] = IPv4Address(ip)
        return found

    async def release(self, mac: str) -> None:
        """Forget ``mac``: drop its fixed address and release its lease.

        Waits until dnsmasq has rewritten its lease file without the lease.
        """
        pid = self.owned_pid()
        path = self._host_file(mac)
        if path.exists():
            path.unlink()
            if pid is not None:
                os.kill(pid, signal.SIGHUP)  # dnsmasq forgets a deleted host file on SIGHUP
        ip = dnsmasq_leases.lookup(self.lease_file, mac)
        if ip is None:
            return
        if pid is None:  # nobody will rewrite the file behind our back
            _drop_lines(self.lease_file, mac)
            return
        try:
            await run("dhcp_release", self.bridge, ip, mac, timeout=START_TIMEOUT)
        except CommandError as e:
            raise NetworkFailed(f"could not release the lease of {mac}: {e.message}") from e
        try:
            await until(
                lambda: dnsmasq_leases.lookup(self.lease_file, mac) is None,
                interval=POLL,
                timeout=RELEASE_TIMEOUT,
            )
        except TimeoutError:
            raise NetworkFailed(
                f"dnsmasq on {self.bridge} kept the lease of {mac} ({ip})"
            ) from None
