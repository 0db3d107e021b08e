#!/usr/bin/env python3
"""A stand-in for VMware's ``vmrun``, for the tests: VMware can't run here.

It follows vmrun's documented command line and the behaviour that public transcripts of real
runs show, not what the driver expects. Where no source was found, the stand-in's own choice
is marked *(stand-in)*; those are the first things to check on a real host (docs/vmware.md).

Command line, from vmrun's usage text (``vmrun`` with no arguments; reproduced in many public
repositories, e.g. Meir-Tools' VMware menu script, "vmrun version 1.17.0")::

    vmrun [-T ws|fusion|player] [-vp ...] [-gu ...] [-gp ...] COMMAND [PARAMETERS]
    start             Path to vmx file [gui|nogui]
    stop              Path to vmx file [hard|soft]
    snapshot          Path to vmx file, Snapshot name
    listSnapshots     Path to vmx file
    getGuestIPAddress Path to vmx file [-wait]
    readVariable      Path to vmx file [runtimeConfig|guestEnv|guestVar] variable name
    list
    deleteVM          Path to vmx file
    clone             Path to vmx file, Path to destination vmx file, full|linked,
                      [-snapshot=Snapshot Name] [-cloneName=Name]

Output and errors:

- Errors are one line ``Error: ...`` on stdout, nothing on stderr, exit status 255
  (hashicorp/vagrant#6772: ``clone`` printed "Error: The file is already in use" with exit
  status 255; hashicorp/vagrant#11528: ``getGuestIPAddress`` printed "Error: The VMware Tools
  are not running in the virtual machine: PATH", exit status 255). Success exits 0.
- A held lock: "Error: The file is already in use" (vagrant#6772).
- A missing ``.vmx``: "Error: Cannot open VM: PATH, Cannot read the virtual machine
  configuration file" (cloudfoundry-attic/bosh-lite#257). A path without the ``.vmx``
  suffix: "Error: Cannot open VM: PATH, unknown file suffix" (as quoted in goldclone issue
  #3; no public transcript found).
- ``stop`` of a VM that is not running: "Error: The virtual machine is not powered on: PATH"
  (hashicorp/packer#1300); ``getGuestIPAddress`` of one likewise.
- ``list``: "Total running VMs: N", then one ``.vmx`` path a line (GNS3/gns3-server#328).
- ``listSnapshots``: "Total snapshots: N", then one name a line.
- ``getGuestIPAddress`` prints the address; without ``-wait`` it fails while the guest has
  none (VMware Tools not up yet), with ``-wait`` it blocks until there is one
  (docker/machine#4847: headless guests need ``-wait``).
- ``readVariable VMX guestVar NAME`` prints the VM's ``guestinfo.NAME``: what a guest reads
  with ``vmware-rpctool "info-get guestinfo.NAME"``, and what cloud-init's VMware datasource
  reads, so a test can ask for what the guest was told. Values come from the ``.vmx`` as it
  was at power-on (VMware loads ``guestinfo.*`` settings into the guest's variables when it
  starts the VM). An unset variable prints an empty line *(stand-in)*; ``runtimeConfig``
  reads any ``.vmx`` key; ``guestEnv`` needs VMware Tools and guest credentials, which the
  stand-in does not have, so it fails *(stand-in wording)*.
- ``start ... nogui`` can fail on some hosts where ``gui`` works: "Error: The operation was
  canceled" (hashicorp/packer#7715 on Workstation 15.1; hashicorp/vagrant#4673 on Fusion 7).

Files, as VMware writes them:

- ``snapshot`` on a powered-off VM adds ``<vm>.vmsd`` (``snapshot.lastUID``,
  ``snapshot.current``, ``snapshot.numSnapshots``, ``snapshotN.uid``, ``.displayName``,
  ``.filename``, ``.diskK.fileName``/``.node``, ``.numDisks``), a ``-SnapshotN.vmsn`` file,
  and a delta disk ``<disk>-00000N.vmdk`` that the ``.vmx`` then names instead of its disk.
  Snapshot names need not be unique.
- ``clone ... linked`` writes the clone's folder: its ``.vmx`` (the source's, with
  ``displayName`` set to ``-cloneName`` and each disk a new delta disk whose descriptor's
  ``parentFileNameHint`` names the snapshot's disk), and a ``.vmsd`` with ``cloneOf0`` (the
  source ``.vmx``) and ``numCloneOf``; the source's ``.vmsd`` records the clone as
  ``snapshotN.cloneK`` and ``snapshotN.numClones``. Without ``-snapshot`` it first takes a
  new snapshot "Clone", "Created by clone operation." (both from real ``.vmsd`` files in
  public test fixtures). An unknown ``-snapshot`` name fails *(stand-in wording)*.
- ``deleteVM`` removes the VM's files and its entry in the parent's ``.vmsd``; it refuses a
  running VM *(stand-in wording)*. ``start`` of a running VM fails *(stand-in wording)*.
- Files a ``.vmx`` names: VMware opens the files of the devices a VM has (CD-ROM and floppy
  images, serial and parallel port backing files, the NVRAM, shared folders' host paths) when
  it powers the VM on, and reads the configuration when it snapshots or clones it. Which of
  them ``snapshot`` and ``clone`` open is not documented, so the stand-in assumes the worst
  *(stand-in)*: ``snapshot``, ``clone`` (its source) and ``start`` each "open" every file
  that the ``.vmx`` of a present device or setting names, and record its absolute path in
  ``opened.jsonl``, so that a test can check that none lies outside goldclone's own folders.

State lives in files under ``$FAKE_VMRUN_STATE``: ``state.json`` (the running VMs, their IPs),
``calls.jsonl`` (every command line), ``control.json`` (what the test asks for). Snapshots and
clones are the real files above. ``control.json`` may hold:

- ``locked``: ``.vmx`` paths (or ``"*"``) on which every command fails with the lock error;
- ``ip_delay``: seconds from ``start`` until the guest has an IP;
- ``guest_ip``: false for a guest that never gets one;
- ``tools``: false for a guest whose address only vmnet-dhcpd knows (``getGuestIPAddress``
  never answers);
- ``lease_file``: where to append an ISC dhcpd lease for each started guest, as vmnet-dhcpd;
- ``nogui_error``: the error of every ``start ... nogui`` (the Fusion 7 headless problem);
- ``soft_stop_hangs``: ``stop ... soft`` never returns (a guest that ignores the request);
- ``list_error``: the error of every ``list``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from goldclone.images.checks import vmx_disks
from goldclone.images.vmx import VmxFile, read_vmx

STATE_VARIABLE = "FAKE_VMRUN_STATE"
_POLL = 0.1
_NAMES_FILE = re.compile(
    r"(filename|\.file|^nvram|checkpoint\.vmstate|workingdir|swap\.dir|hostpath)$", re.IGNORECASE
)
_SUBNETS = {"nat": "192.168.150", "hostonly": "192.168.151", "bridged": "10.77.1"}


class VmrunError(Exception):
    """Printed as ``Error: <message>``; vmrun then exits 255."""


# -- the tests' side ------------------------------------------------------------------------------


class FakeVmrun:
    """Installs the stand-in as an executable ``vmrun`` under ``root``, and steers and reads it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = root / "bin" / "vmrun"
        self.path.parent.mkdir(exist_ok=True)
        self.path.write_text(
            "#!/bin/sh\n"
            f"{STATE_VARIABLE}='{self.state_dir}' exec '{sys.executable}' '{__file__}' \"$@\"\n"
        )
        self.path.chmod(0o755)
        self.lease_file = root / "vmnet8.leases"

    def control(self, **changes: Any) -> None:
        """Change what the stand-in does from its next command on."""
        World(self.state_dir).update_control(changes)

    def calls(self, command: str | None = None) -> list[list[str]]:
        """Every command line so far (without the ``-T`` flag), or those of ``command``."""
        path = self.state_dir / "calls.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        calls = [_without_flags(json.loads(line)) for line in lines]
        return [call for call in calls if command is None or call[0] == command]

    def opened(self) -> list[Path]:
        """Every file that VMware would have opened so far (see ``open_named_files``)."""
        path = self.state_dir / "opened.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [Path(json.loads(line)) for line in lines]

    def running(self) -> dict[str, dict[str, Any]]:
        """The running VMs by ``.vmx`` path, each with its ``mode`` and ``ip``."""
        running: dict[str, dict[str, Any]] = World(self.state_dir).load()["running"]
        return running

    def read_variable(self, vmx: Path, name: str) -> str:
        """``vmrun readVariable VMX guestVar NAME``: what the guest reads as ``guestinfo.NAME``."""
        out = subprocess.run([str(self.path), "readVariable", str(vmx), "guestVar", name],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.rstrip("\n")

    def power_off(self, vmx: Path) -> None:
        """The guest shuts itself down."""
        world = World(self.state_dir)
        with world.locked():
            state = world.load()
            state["running"].pop(str(vmx), None)
            world.save(state)


# -- the stand-in's side --------------------------------------------------------------------------


class World:
    """The stand-in's files."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    @contextmanager
    def locked(self) -> Iterator[None]:
        with (self.dir / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def load(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        state.setdefault("running", {})
        state.setdefault("next_host", 10)
        return state

    def save(self, state: dict[str, Any]) -> None:
        _replace(self.dir / "state.json", json.dumps(state).encode())

    def control(self) -> dict[str, Any]:
        path = self.dir / "control.json"
        control: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return control

    def update_control(self, changes: dict[str, Any]) -> None:
        with self.locked():
            _replace(self.dir / "control.json", json.dumps(self.control() | changes).encode())

    def record(self, argv: list[str]) -> None:
        with self.locked(), (self.dir / "calls.jsonl").open("a") as calls:
            calls.write(json.dumps(argv) + "\n")

    def open_named_files(self, vmx_path: Path) -> None:
        """Record the files that VMware would open for the VM at ``vmx_path``."""
        vmx = read_vmx(vmx_path)
        paths = []
        for key in vmx:
            value = vmx.get(key) or ""
            device = key.rsplit(".", 1)[0]
            if not _NAMES_FILE.search(key) or not value or value.lower() == "auto detect":
                continue
            if (vmx.get(f"{device}.present") or "TRUE").strip().lower() == "false":
                continue
            paths.append(os.path.normpath(vmx_path.parent / value))
        with self.locked(), (self.dir / "opened.jsonl").open("a") as opened:
            opened.writelines(json.dumps(path) + "\n" for path in paths)

    def check_unlocked(self, *vmx_paths: str) -> None:
        locked = self.control().get("locked", [])
        if "*" in locked or any(path in locked for path in vmx_paths):
            raise VmrunError("The file is already in use")


def main(argv: list[str]) -> int:
    world = World(Path(os.environ[STATE_VARIABLE]))
    world.record(argv)
    args = _without_flags(argv)
    if not args:
        print("vmrun version 0.0.0 (goldclone's stand-in)\n\nUsage: vmrun [-T ws|fusion] COMMAND")
        return 255
    command = _COMMANDS.get(args[0].lower())
    try:
        if command is None:
            raise VmrunError(f"Unrecognized command: {args[0]}")
        output = command(world, args[1:])
    except VmrunError as exc:
        print(f"Error: {exc}")
        return 255
    if output:
        print(output)
    return 0


def _without_flags(argv: list[str]) -> list[str]:
    args = list(argv)
    while len(args) >= 2 and args[0] in ("-T", "-vp", "-gu", "-gp", "-h", "-u", "-p", "-P"):
        args = args[2:]
    return args


def _open(path: str) -> Path:
    if not path.lower().endswith(".vmx"):
        raise VmrunError(f"Cannot open VM: {path}, unknown file suffix")
    if not Path(path).is_file():
        raise VmrunError(
            f"Cannot open VM: {path}, Cannot read the virtual machine configuration file"
        )
    return Path(path)


def _params(params: list[str], count: int) -> list[str]:
    if len(params) < count:
        raise VmrunError("Invalid number of parameters")
    return params


# -- commands -------------------------------------------------------------------------------------


def _list(world: World, params: list[str]) -> str:
    if error := world.control().get("list_error"):
        raise VmrunError(error)
    running = world.load()["running"]
    return "\n".join([f"Total running VMs: {len(running)}", *running])


def _start(world: World, params: list[str]) -> str:
    path = _open(_params(params, 1)[0])
    mode = params[1] if len(params) > 1 else "gui"
    if mode not in ("gui", "nogui"):
        raise VmrunError("Invalid argument: " + mode)
    world.check_unlocked(str(path))
    world.open_named_files(path)
    control = world.control()
    with world.locked():
        state = world.load()
        if str(path) in state["running"]:
            raise VmrunError("The virtual machine should not be powered on. It is already running.")
        if mode == "nogui" and control.get("nogui_error"):
            raise VmrunError(control["nogui_error"])
        vmx = read_vmx(path)
        mac = vmx.get("ethernet0.address") or vmx.get("ethernet0.generatedAddress")
        if not mac:
            mac = ":".join(["00:0c:29", *(f"{byte:02x}" for byte in os.urandom(3))])
            vmx.set("ethernet0.generatedAddress", mac)
            _replace(path, vmx.to_bytes())
        subnet = _SUBNETS.get((vmx.get("ethernet0.connectionType") or "").lower(), "10.77.2")
        ip = f"{subnet}.{state['next_host']}"
        state["next_host"] += 1
        guestinfo = {
            key.lower().removeprefix("guestinfo."): vmx.get(key) or ""
            for key in vmx
            if key.lower().startswith("guestinfo.")
        }
        state["running"][str(path)] = {"mode": mode, "since": time.time(), "ip": ip, "mac": mac,
                                       "guestinfo": guestinfo}  # fmt: skip
        world.save(state)
        if control.get("lease_file") and control.get("guest_ip", True):
            _write_lease(Path(control["lease_file"]), ip, mac)
    return ""


def _stop(world: World, params: list[str]) -> str:
    path = _open(_params(params, 1)[0])
    mode = params[1] if len(params) > 1 else "soft"
    world.check_unlocked(str(path))
    if str(path) not in world.load()["running"]:
        raise VmrunError(f"The virtual machine is not powered on: {path}")
    if mode == "soft" and world.control().get("soft_stop_hangs"):
        while True:
            time.sleep(_POLL)
    with world.locked():
        state = world.load()
        state["running"].pop(str(path), None)
        world.save(state)
    return ""


def _get_guest_ip_address(world: World, params: list[str]) -> str:
    path = _open(_params(params, 1)[0])
    wait = "-wait" in params[1:]
    world.check_unlocked(str(path))
    while True:
        vm = world.load()["running"].get(str(path))
        if vm is None:
            raise VmrunError(f"The virtual machine is not powered on: {path}")
        control = world.control()
        has_ip = control.get("guest_ip", True) and control.get("tools", True)
        if has_ip and time.time() >= vm["since"] + float(control.get("ip_delay", 0)):
            return str(vm["ip"])
        if not wait:
            raise VmrunError(f"The VMware Tools are not running in the virtual machine: {path}")
        time.sleep(_POLL)


def _read_variable(world: World, params: list[str]) -> str:
    vmx_path, kind, name = _params(params, 3)[:3]
    path = _open(vmx_path)
    world.check_unlocked(str(path))
    vm = world.load()["running"].get(str(path))
    if vm is None:
        raise VmrunError(f"The virtual machine is not powered on: {path}")
    if kind == "guestVar":
        return str(vm["guestinfo"].get(name.lower(), "")) or "\n"
    if kind == "runtimeConfig":
        return (read_vmx(path).get(name) or "") or "\n"
    raise VmrunError("Invalid user name or password for the guest OS")


def _snapshot(world: World, params: list[str]) -> str:
    path = _open(_params(params, 2)[0])
    world.check_unlocked(str(path))
    world.open_named_files(path)
    with world.locked():
        _take_snapshot(path, params[1], "")
    return ""


def _list_snapshots(world: World, params: list[str]) -> str:
    path = _open(_params(params, 1)[0])
    world.check_unlocked(str(path))
    names = [name for _, name in _snapshots(_read_vmsd(path))]
    return "\n".join([f"Total snapshots: {len(names)}", *names])


def _clone(world: World, params: list[str]) -> str:
    source, dest_name, kind = _params(params, 3)[:3]
    options = dict(option.split("=", 1) for option in params[3:] if "=" in option)
    source_path = _open(source)
    dest = Path(dest_name)
    world.check_unlocked(source, dest_name)
    world.open_named_files(source_path)
    if kind not in ("full", "linked"):
        raise VmrunError(f"Invalid clone type: {kind}")
    with world.locked():
        if dest.exists():
            raise VmrunError(f"The destination file already exists: {dest}")
        vmsd = _read_vmsd(source_path)
        if "-snapshot" in options:
            prefix = next((p for p, n in _snapshots(vmsd) if n == options["-snapshot"]), None)
            if prefix is None:
                raise VmrunError(f"Invalid snapshot name '{options['-snapshot']}'")
        else:
            prefix = _take_snapshot(source_path, "Clone", "Created by clone operation.")
            vmsd = _read_vmsd(source_path)
        _write_clone(source_path, vmsd, prefix, dest, options.get("-cloneName"), kind)
    return ""


def _delete_vm(world: World, params: list[str]) -> str:
    path = _open(_params(params, 1)[0])
    world.check_unlocked(str(path))
    with world.locked():
        if str(path) in world.load()["running"]:
            raise VmrunError("The virtual machine is powered on. Power it off first.")
        own_vmsd = _read_vmsd(path)
        if parent := own_vmsd.get("cloneOf0"):
            _forget_clone(Path(parent), path)
        for _, name in vmx_disks(read_vmx(path)):
            if "/" not in name:
                (path.parent / name).unlink(missing_ok=True)
        for file in path.parent.glob(f"{path.stem}*"):
            file.unlink()
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return ""


_COMMANDS: dict[str, Callable[[World, list[str]], str]] = {
    "list": _list,
    "start": _start,
    "stop": _stop,
    "getguestipaddress": _get_guest_ip_address,
    "readvariable": _read_variable,
    "snapshot": _snapshot,
    "listsnapshots": _list_snapshots,
    "clone": _clone,
    "deletevm": _delete_vm,
}


# -- the files ------------------------------------------------------------------------------------


def _read_vmsd(vmx_path: Path) -> VmxFile:
    vmsd = vmx_path.with_suffix(".vmsd")
    return read_vmx(vmsd) if vmsd.exists() else VmxFile.parse(b'.encoding = "UTF-8"\n')


def _snapshots(vmsd: VmxFile) -> list[tuple[str, str]]:
    """``(key prefix, name)`` of each snapshot in ``vmsd``."""
    count = int(vmsd.get("snapshot.numSnapshots") or 0)
    return [(f"snapshot{i}", vmsd.get(f"snapshot{i}.displayName") or "") for i in range(count)]


def _take_snapshot(vmx_path: Path, name: str, description: str) -> str:
    vmx, vmsd = read_vmx(vmx_path), _read_vmsd(vmx_path)
    uid = int(vmsd.get("snapshot.lastUID") or 0) + 1
    prefix = f"snapshot{int(vmsd.get('snapshot.numSnapshots') or 0)}"
    if current := vmsd.get("snapshot.current"):
        vmsd.set(f"{prefix}.parent", current)
    vmsd.set(f"{prefix}.uid", str(uid))
    vmsd.set(f"{prefix}.filename", f"{vmx_path.stem}-Snapshot{uid}.vmsn")
    vmsd.set(f"{prefix}.displayName", name)
    if description:
        vmsd.set(f"{prefix}.description", description)
    disks = vmx_disks(vmx)
    for index, (slot, disk) in enumerate(disks):
        vmsd.set(f"{prefix}.disk{index}.fileName", disk)
        vmsd.set(f"{prefix}.disk{index}.node", slot)
        delta = f"{Path(disk).stem.rsplit('-0', 1)[0]}-{uid:06d}.vmdk"
        _write_delta(vmx_path.parent / delta, disk)
        vmx.set(f"{slot}.fileName", delta)
    vmsd.set(f"{prefix}.numDisks", str(len(disks)))
    vmsd.set("snapshot.lastUID", str(uid))
    vmsd.set("snapshot.current", str(uid))
    vmsd.set("snapshot.numSnapshots", str(int(prefix.removeprefix("snapshot")) + 1))
    (vmx_path.parent / f"{vmx_path.stem}-Snapshot{uid}.vmsn").write_bytes(b"stand-in state")
    _replace(vmx_path.with_suffix(".vmsd"), vmsd.to_bytes())
    _replace(vmx_path, vmx.to_bytes())
    return prefix


def _write_clone(
    source: Path, vmsd: VmxFile, prefix: str, dest: Path, name: str | None, kind: str
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    vmx = read_vmx(source)
    for index in range(int(vmsd.get(f"{prefix}.numDisks") or 0)):
        disk = vmsd.get(f"{prefix}.disk{index}.fileName") or ""
        slot = vmsd.get(f"{prefix}.disk{index}.node") or ""
        parent = Path(disk) if disk.startswith("/") else source.parent / disk
        own = f"{dest.stem}-cl{index + 1}.vmdk"
        if kind == "linked":
            _write_delta(dest.parent / own, str(parent))
        else:
            shutil.copyfile(parent, dest.parent / own)
        vmx.set(f"{slot}.fileName", own)
    for key in vmx:
        if key.lower().endswith(".generatedaddress"):
            vmx.delete(key)
    vmx.set("displayName", name or f"Clone of {source.stem}")
    _replace(dest, vmx.to_bytes())
    if kind == "linked":
        clone_vmsd = VmxFile.parse(b'.encoding = "UTF-8"\n')
        clone_vmsd.set("cloneOf0", str(source))
        clone_vmsd.set("numCloneOf", "1")
        _replace(dest.with_suffix(".vmsd"), clone_vmsd.to_bytes())
        count = int(vmsd.get(f"{prefix}.numClones") or 0)
        vmsd.set(f"{prefix}.clone{count}", str(dest))
        vmsd.set(f"{prefix}.numClones", str(count + 1))
        _replace(source.with_suffix(".vmsd"), vmsd.to_bytes())


def _forget_clone(parent_vmx: Path, clone: Path) -> None:
    vmsd = _read_vmsd(parent_vmx)
    for prefix, _ in _snapshots(vmsd):
        clones = [
            vmsd.get(f"{prefix}.clone{i}") or ""
            for i in range(int(vmsd.get(f"{prefix}.numClones") or 0))
        ]
        if str(clone) not in clones:
            continue
        for index in range(len(clones)):
            vmsd.delete(f"{prefix}.clone{index}")
        kept = [path for path in clones if path != str(clone)]
        for index, path in enumerate(kept):
            vmsd.set(f"{prefix}.clone{index}", path)
        vmsd.set(f"{prefix}.numClones", str(len(kept)))
    if parent_vmx.with_suffix(".vmsd").exists():
        _replace(parent_vmx.with_suffix(".vmsd"), vmsd.to_bytes())


def _write_delta(path: Path, parent: str) -> None:
    path.write_text(
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\nparentCID=fffffffe\n'
        f'createType="monolithicSparse"\nparentFileNameHint="{parent}"\n\n'
        f'# Extent description\nRW 0 SPARSE "{path.name}"\n'
    )


def _write_lease(path: Path, ip: str, mac: str) -> None:
    now = datetime.now(UTC)
    stamp = lambda t: f"{t.isoweekday() % 7} {t:%Y/%m/%d %H:%M:%S}"  # noqa: E731
    with path.open("a") as leases:
        leases.write(
            f"lease {ip} {{\n\tstarts {stamp(now)};\n\tends {stamp(now + timedelta(minutes=30))};\n"
            f"\thardware ethernet {mac};\n}}\n"
        )


def _replace(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
