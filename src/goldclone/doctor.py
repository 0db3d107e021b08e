"""``goldclone doctor``: what this host has of what the service needs, and what to do about the
rest. Each check is a ``Finding``; ``check_host`` makes them and ``render_findings`` prints them.

The checks follow the settings: the QEMU driver needs QEMU, qemu-img, dnsmasq, nftables,
iproute2, nice and chrt, and the capabilities to make bridges and taps, and tells whether KVM
really runs guests (the driver's own probe); the vmware driver needs vmrun; every driver needs a
data dir on a filesystem that takes what the service keeps there, with room beyond the reserve;
a PostgreSQL store, room for every host's connections.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import asyncpg

from goldclone.drivers.qemu.accel import kvm_problem
from goldclone.drivers.qemu.bounds import group_name
from goldclone.drivers.qemu.driver import MAX_DATA_DIR_LENGTH
from goldclone.drivers.qemu.network import Networks
from goldclone.errors import CommandError, DriverUnavailable, NetworkFailed
from goldclone.host.cgroups import Cgroups
from goldclone.host.commands import run
from goldclone.service.fleet import HOST_ID_FILE
from goldclone.settings import Settings
from goldclone.store.listener import asyncpg_dsn

VERSION_TIMEOUT = 10.0
TESTED_QEMU = (7, 2)
"""Debian 12's QEMU, which the test suite runs."""


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    """One check: what was found, and what to do about it (empty when nothing)."""

    name: str
    verdict: Verdict
    found: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "verdict": self.verdict.value, "found": self.found,
                "fix": self.fix}  # fmt: skip


async def check_host(settings: Settings) -> list[Finding]:
    """Check this host for the service that ``settings`` describe."""
    findings = [_data_dir(settings), _free_space(settings)]
    if settings.driver == "qemu":
        findings += await asyncio.gather(
            _program("qemu", settings.qemu_binary, "qemu-system-x86", "--version",
                     also="or set qemu (GOLDCLONE_QEMU) to its path"),
            _program("qemu-img", "qemu-img", "qemu-utils", "--version"),
            _program("dnsmasq", "dnsmasq", "dnsmasq-base", "--version"),
            _program("dhcp_release", "dhcp_release", "dnsmasq-utils", None),
            _program("nftables", "nft", "nftables", "--version"),
            _program("iproute2", "ip", "iproute2", "-V"),
            _program("nice", "nice", "coreutils", "--version"),
            _program("chrt", "chrt", "util-linux", "--version"),
            _kvm(settings),
            _walls(settings),
        )  # fmt: skip
        findings.append(_cgroups(settings))
        findings.append(capabilities(Path("/proc/self/status").read_text(), os.geteuid()))
    elif settings.driver == "vmware":
        findings.append(_vmrun(settings))
    if settings.db_url.startswith("postgresql"):
        findings.append(await store_connections(settings))
    return findings


async def store_connections(settings: Settings) -> Finding:
    """Whether the fleet's connections fit the PostgreSQL server's: every host known to the
    store (and this one) holding ``StorePool.most``, within ``max_connections`` less the
    superuser's reserve."""
    name = "store"
    try:
        connection = await asyncpg.connect(asyncpg_dsn(settings.db_url), timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        return Finding(name, Verdict.PROBLEM, f"the database cannot be reached: "
                       f"{type(exc).__name__}", "check database_url and that it runs")  # fmt: skip
    try:
        most = int(await connection.fetchval("SHOW max_connections"))
        reserved = int(await connection.fetchval("SHOW superuser_reserved_connections"))
        known = await connection.fetch("SELECT id FROM hosts") if await connection.fetchval(
            "SELECT to_regclass('hosts') IS NOT NULL"
        ) else []  # fmt: skip
    finally:
        await connection.close()
    kept = settings.data_dir / HOST_ID_FILE
    this = settings.host_id or (kept.read_text().strip() if kept.is_file() else "this host")
    hosts = len({row["id"] for row in known} | {this})
    each, room = settings.store_pool.most, most - reserved
    found = (f"{hosts} host(s) x {each} connections = {hosts * each}, of the server's {room} "
             f"(max_connections {most} less {reserved} reserved)")  # fmt: skip
    if hosts * each > room:
        fix = ("raise max_connections, lower GOLDCLONE_DB_POOL_SIZE or GOLDCLONE_DB_MAX_OVERFLOW, "
               "or put PgBouncer in front (docs/operations.md)")  # fmt: skip
        return Finding(name, Verdict.PROBLEM, found, fix)
    return Finding(name, Verdict.OK, found)


def _cgroups(settings: Settings) -> Finding:
    """Whether the service can make its machines' cgroups (``host.cgroups``)."""
    unbounded = "VMs would run without CPU, memory and task bounds"
    found = Cgroups.find(group_name(settings.data_dir))
    if found is None:
        fix = "mount the cgroup controllers (v2, or v1 cpu, cpuacct, memory, pids)"
        return Finding("cgroups", Verdict.WARNING, f"no cgroup hierarchy to use: {unbounded}", fix)
    for parent in found.parents.values():
        probe = parent.parent / f"goldclone-doctor-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            found_ = f"cannot make a group in {parent.parent}: {exc.strerror}: {unbounded}"
            fix = "run as root, or delegate that group to the service (Delegate=yes)"
            return Finding("cgroups", Verdict.WARNING, found_, fix)
    controllers = ", ".join(sorted(found.parents)) or "the unified hierarchy"
    return Finding("cgroups", Verdict.OK, f"cgroup v{found.version}: {controllers}")


async def _walls(settings: Settings) -> Finding:
    """Whether every VM tap on this service's networks has its rules (``docs/design.md``,
    "Walls")."""
    try:
        bare = await Networks(settings.network, settings.data_dir / "networks").unguarded()
    except (CommandError, NetworkFailed) as exc:
        return Finding("walls", Verdict.WARNING, f"could not be checked: {exc}")
    if not bare:
        return Finding("walls", Verdict.OK, "every VM tap has its rules")
    taps = "; ".join(f"{', '.join(taps)} on {name}" for name, taps in bare.items())
    fix = "start the service, or wait for its next network check: it writes them again"
    return Finding("walls", Verdict.PROBLEM, f"VM taps without rules: {taps}", fix)


def render_findings(findings: Sequence[Finding]) -> tuple[list[str], int]:
    """The findings as lines of text, a summary last, and the exit status: 1 if any is a
    problem, else 0."""
    width = max((len(finding.name) for finding in findings), default=0)
    lines = []
    for finding in findings:
        lines.append(f"{finding.verdict.value:<7}  {finding.name:<{width}}  {finding.found}")
        if finding.fix:
            lines.append(f"{'':<7}  {'':<{width}}  fix: {finding.fix}")
    problems = sum(finding.verdict is Verdict.PROBLEM for finding in findings)
    warnings = sum(finding.verdict is Verdict.WARNING for finding in findings)
    if problems or warnings:
        lines.append(f"{_count(problems, 'problem')}, {_count(warnings, 'warning')}")
    else:
        lines.append("all fine")
    return lines, 1 if problems else 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


# -- programs ----------------------------------------------------------------------------------


async def _program(
    name: str, binary: str, package: str, version_flag: str | None, also: str = ""
) -> Finding:
    install = f"apt-get install {package} (Debian and Ubuntu){', ' + also if also else ''}"
    path = shutil.which(binary)
    if path is None:
        return Finding(name, Verdict.PROBLEM, f"{binary} is not installed or not on PATH", install)
    if version_flag is None:
        return Finding(name, Verdict.OK, path)
    try:
        code, out, err = await run(path, version_flag, timeout=VERSION_TIMEOUT, check=False)
    except CommandError as exc:
        return Finding(name, Verdict.PROBLEM, f"{path} {version_flag}: {exc.message}", install)
    first = next((line.strip() for line in (out + err).splitlines() if line.strip()), "")
    if code != 0:
        return Finding(name, Verdict.PROBLEM, f"{path} {version_flag} failed: {first}", install)
    version = re.search(r"version (\d+)\.(\d+)", first)
    if name == "qemu" and version and tuple(map(int, version.groups())) < TESTED_QEMU:
        tested = ".".join(map(str, TESTED_QEMU))
        upgrade = f"goldclone is tested with QEMU {tested} and later; upgrade QEMU"
        return Finding(name, Verdict.WARNING, f"{first} ({path})", upgrade)
    return Finding(name, Verdict.OK, f"{first} ({path})")


def _vmrun(settings: Settings) -> Finding:
    from goldclone.drivers.vmware.vmrun import locate

    try:
        return Finding("vmrun", Verdict.OK, locate(settings.vmware.vmrun))
    except DriverUnavailable as exc:
        return Finding("vmrun", Verdict.PROBLEM, exc.message, "see docs/vmware.md")


# -- KVM ---------------------------------------------------------------------------------------

_KVM_FIX = (
    "turn on virtualisation (VT-x or AMD-V) in the firmware, or nested virtualisation for this "
    "VM; load kvm_intel or kvm_amd; give the service's user /dev/kvm"
)


async def _kvm(settings: Settings) -> Finding:
    if shutil.which(settings.qemu_binary) is None:
        return Finding("kvm", Verdict.WARNING, "not probed: QEMU is missing")
    problem = await kvm_problem(settings.qemu_binary)
    if settings.accel == "tcg":
        if problem is None:
            return Finding("kvm", Verdict.WARNING, "KVM works, but accel is tcg: guests are slow",
                           "set accel (GOLDCLONE_ACCEL) to auto")  # fmt: skip
        return Finding("kvm", Verdict.OK, f"not used (accel is tcg): {problem}")
    if problem is None:
        return Finding("kvm", Verdict.OK, "a probe guest ran under KVM: guests use it")
    if settings.accel == "kvm":
        return Finding("kvm", Verdict.PROBLEM, f"{problem}; accel is kvm, so no guest can boot",
                       f"{_KVM_FIX}; or set accel (GOLDCLONE_ACCEL) to auto")  # fmt: skip
    return Finding("kvm", Verdict.WARNING,
                   f"{problem}; guests run under TCG, many times slower", _KVM_FIX)  # fmt: skip


# -- privileges --------------------------------------------------------------------------------

NEEDED_CAPABILITIES = {
    "CAP_KILL": (5, "ending QEMU and dnsmasq, which run as another user"),
    "CAP_SETGID": (6, "QEMU and dnsmasq dropping to their own user"),
    "CAP_SETUID": (7, "QEMU and dnsmasq dropping to their own user"),
    "CAP_NET_BIND_SERVICE": (10, "dnsmasq's DHCP and DNS ports"),
    "CAP_NET_ADMIN": (12, "bridges, taps and nftables rules"),
    "CAP_NET_RAW": (13, "DHCP, and watching for a bridged guest's DHCP answer"),
}
"""What the QEMU driver's networks and processes need, by capability number."""


def capabilities(status: str, euid: int) -> Finding:
    """Whether a process with ``/proc/<pid>/status`` text ``status`` may do what the QEMU
    driver does. Root's programs get its bounding set; another user's keep only its ambient
    capabilities across ``exec``, and the driver does its work through programs."""
    sets = {
        name: int(value, 16)
        for name, value in re.findall(r"^(Cap\w+):\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    }
    usable = sets.get("CapEff", 0) & sets.get("CapBnd", 0) if euid == 0 else sets.get("CapAmb", 0)
    missing = [name for name, (bit, _) in NEEDED_CAPABILITIES.items() if not usable >> bit & 1]
    who = "root" if euid == 0 else f"user {euid}"
    if not missing:
        return Finding("privileges", Verdict.OK, f"{who}, with every capability the QEMU driver "
                                                 "needs")  # fmt: skip
    why = "; ".join(f"{name} ({NEEDED_CAPABILITIES[name][1]})" for name in missing)
    return Finding("privileges", Verdict.PROBLEM, f"{who}, without {why}",
                   "run goldclone serve as root, as contrib/goldclone.service does, with these "
                   "capabilities in its bounding set")  # fmt: skip


# -- the data dir ------------------------------------------------------------------------------

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "9p", "fuse.sshfs", "ceph", "glusterfs")


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists: where it will be made."""
    while not os.path.exists(path) and path != path.parent:  # False where it cannot look too
        path = path.parent
    return path


def mount_of(path: Path, mountinfo: str) -> tuple[str, str]:
    """The mount point and filesystem type that ``path`` is on, from ``/proc/self/mountinfo``."""
    best = ("/", "unknown")
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(" - ")
        mount_point = _unescape(fields.split()[4])
        if path.is_relative_to(mount_point) and len(mount_point) >= len(best[0]):
            best = (mount_point, after.split()[0])
    return best


def _unescape(field: str) -> str:
    """A mountinfo field, with its octal escapes (``\\040`` for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def _data_dir(settings: Settings) -> Finding:
    data_dir = settings.data_dir.absolute()
    if settings.driver == "qemu" and len(str(data_dir)) > MAX_DATA_DIR_LENGTH:
        return Finding("data dir", Verdict.PROBLEM,
                       f"{data_dir} is longer than {MAX_DATA_DIR_LENGTH} characters, too long "
                       "for the VMs' QMP sockets", "choose a shorter data_dir")  # fmt: skip
    where = _existing(data_dir.resolve())
    mount_point, fstype = mount_of(where, Path("/proc/self/mountinfo").read_text())
    on = f"{data_dir} ({'' if where == data_dir.resolve() else 'to be made; '}{fstype} on " \
         f"{mount_point})"  # fmt: skip
    problem = _filesystem_problem(where)
    if problem:
        return Finding("data dir", Verdict.PROBLEM, f"{on}: {problem}",
                       "put the data dir on a local Linux filesystem (ext4, xfs, btrfs) that "
                       "the service's user can write")  # fmt: skip
    if fstype in NETWORK_FILESYSTEMS:
        return Finding("data dir", Verdict.WARNING, f"{on}: a network filesystem, so every "
                       "guest's disk and memory go over the network, and locks may not hold",
                       "put the data dir on a local disk")  # fmt: skip
    if fstype == "tmpfs":
        return Finding("data dir", Verdict.WARNING, f"{on}: in memory, so the gold images, the "
                       "store and the VMs are gone at reboot",
                       "put the data dir on a disk")  # fmt: skip
    return Finding("data dir", Verdict.OK, f"{on}: files, modes, locks and sockets work")


def _filesystem_problem(folder: Path) -> str | None:
    """What the data dir's filesystem refuses of what the service does there: read-only
    files (gold images), an exclusive lock (one service per data dir) and unix sockets (each
    VM's QMP and guest agent), tried in a scratch folder that is removed after."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".goldclone-doctor-", dir=folder))
    except OSError as exc:
        return f"cannot write there ({exc.strerror})"
    try:
        probe = scratch / "f"
        probe.write_bytes(b"")
        probe.chmod(0o444)
        if probe.stat().st_mode & 0o777 != 0o444:
            return "it does not keep file modes: gold images could not be made read-only"
        with probe.open("rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(scratch / "s"))
    except OSError as exc:
        return f"{exc.strerror or exc} while trying files, locks and sockets there"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def _free_space(settings: Settings) -> Finding:
    usage = shutil.disk_usage(_existing(settings.data_dir.absolute()))
    free_mb, reserve_mb = usage.free >> 20, settings.reserve_mb
    found = f"{free_mb} MB free of {usage.total >> 20} MB; {reserve_mb} MB kept in reserve"
    if free_mb <= reserve_mb:
        return Finding("free space", Verdict.PROBLEM, f"{found}: no download can start",
                       "free space on the data dir's disk, or lower reserve_mb")  # fmt: skip
    budget = settings.image_cache_bytes
    if budget is not None and budget >> 20 > free_mb - reserve_mb:
        return Finding("free space", Verdict.WARNING,
                       f"{found}; the image cache's budget ({budget >> 20} MB) is more than "
                       "there is room for", "lower image_cache_bytes, or free space")  # fmt: skip
    if free_mb - reserve_mb < 1024:
        return Finding("free space", Verdict.WARNING, f"{found}: under 1 GB for images and VMs",
                       "free space on the data dir's disk")  # fmt: skip
    return Finding("free space", Verdict.OK, found)
