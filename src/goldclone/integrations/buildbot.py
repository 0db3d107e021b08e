"""A Buildbot latent worker on goldclone (``pip install goldclone[buildbot]``): a fresh VM for
each build, from a warm pool when one is named, whose ``buildbot-worker`` goldclone starts
through exec and which connects back to the master; the VM is deleted when the build ends or
fails, and the VMs a master left behind (it was killed mid-build) are deleted when it starts
again. In ``master.cfg``::

    from goldclone.integrations.buildbot import GoldcloneLatentWorker
    c["workers"] = [GoldcloneLatentWorker(
        "vm-worker", url="http://127.0.0.1:12345", token="…", pool="ci",
        master_address="192.168.123.1:9989")]

The guest reaches the master through a host port that goldclone's walls let it reach
(``GOLDCLONE_GUEST_HOST_PORTS``), not through a hole in them (docs/ci.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from typing import Any

from buildbot import config
from buildbot.worker.latent import AbstractLatentWorker
from twisted.internet import defer, threads
from twisted.python import log

from goldclone.client import Client
from goldclone.exec_protocol import ExecRequest
from goldclone.integrations.requests import delete_vm, vm_request

WORKER_LABEL = "buildbot.net/worker"
MASTER_LABEL = "buildbot.net/master"
READY_TIMEOUT = 900.0
WORKER_DIR = "/var/lib/goldclone-buildbot-worker"
# Run by the guest's sh, the password in its environment (never on a command line). --quiet:
# start returns once the worker runs, not once it has attached (the master waits for that).
_START_WORKER = (
    'set -e; rm -rf "$DIR"; '
    'buildbot-worker create-worker --umask=0o22 "$DIR" "$MASTER" "$NAME" "$PASSWORD" >/dev/null; '
    'buildbot-worker start --quiet "$DIR"'
)


class GoldcloneLatentWorker(AbstractLatentWorker):
    """``url`` and ``token``: the goldclone API; ``pool``: a warm pool whose image and shape
    the VMs take (else ``image``, ``cpus``, ``memory``); ``master_address``: ``HOST:PORT``
    at which the guest reaches this master; ``ttl``: each VM's lease, the safety net."""

    def checkConfig(self, name: str, password: str | None = None, **kwargs: Any) -> None:
        for needed in ("url", "master_address"):
            if not kwargs.get(needed):
                config.error(f"GoldcloneLatentWorker {name}: {needed} is needed")
        if not kwargs.get("pool") and not kwargs.get("image"):
            config.error(f"GoldcloneLatentWorker {name}: give a pool or an image")
        super().checkConfig(name, password or "", **_base(kwargs))

    @defer.inlineCallbacks
    def reconfigService(self, name: str, password: str | None = None, **kwargs: Any) -> Any:
        options = {key: kwargs.pop(key, None) for key in _OWN}
        kwargs.setdefault("build_wait_timeout", 0)  # a VM per build
        first = not hasattr(self, "client")
        self.options = options
        self.client = Client(options["url"], token=options["token"])
        self.master_id = options["master_id"] or _master_id()
        if first:  # before it serves: what a master of the same ID left running goes
            yield threads.deferToThread(self._delete_leftovers)
        yield super().reconfigService(name, password or self.getRandomPass(), **kwargs)

    def start_instance(self, build: Any) -> Any:
        return threads.deferToThread(self._start)

    def stop_instance(self, fast: bool = False) -> Any:
        return threads.deferToThread(self._stop)

    def _labels(self) -> dict[str, str]:
        return {WORKER_LABEL: _label(self.workername), MASTER_LABEL: self.master_id}

    def _start(self) -> bool:
        options = self.options
        image = None if options["image"] is None else {"image": options["image"]}
        request = vm_request(self.client, options["pool"], image, {
            "cpus": options["cpus"], "memory": options["memory"], "labels": self._labels(),
            "ttl": options["ttl"], "on_poweroff": "delete",
        })  # fmt: skip
        vm = self.client.create(request)
        self.vm_id: str | None = vm.id
        log.msg(f"goldclone: VM {vm.id} for worker {self.workername}")
        vm = self.client.wait_until_running(vm.id, timeout=READY_TIMEOUT)
        env = {"DIR": WORKER_DIR, "MASTER": options["master_address"],
               "NAME": self.workername, "PASSWORD": self.password}  # fmt: skip
        started = self.client.exec(vm.id, ExecRequest(script=_START_WORKER, env=env))
        if started.result.exit_code != 0:
            said = (started.stderr or started.stdout).decode(errors="replace").strip()
            raise RuntimeError(f"buildbot-worker did not start in VM {vm.id}: {said[-500:]}")
        log.msg(f"goldclone: worker {self.workername} started in VM {vm.id} ({vm.started_from})")
        return True

    def _stop(self) -> bool:
        vm_id: str | None = getattr(self, "vm_id", None)
        self.vm_id = None
        if vm_id is not None:
            delete_vm(self.client, vm_id)
        return True

    def _delete_leftovers(self) -> None:
        for vm in self.client.list_vms(labels=self._labels()):
            log.msg(f"goldclone: deleting VM {vm.id}, left by an earlier run of this master")
            delete_vm(self.client, vm.id)


_OWN = ("url", "token", "pool", "image", "cpus", "memory", "master_address", "ttl", "master_id")


def _base(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in _OWN}


def _master_id() -> str:
    """This master: its machine and its folder, as a label value."""
    host = socket.gethostname()
    digest = hashlib.sha256(f"{host}:{os.getcwd()}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9.-]', '-', host)[:30]}-{digest}"


def _label(value: str) -> str:
    return value if len(value) <= 63 else hashlib.sha256(value.encode()).hexdigest()[:32]
