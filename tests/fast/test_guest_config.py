"""Guest configuration through the API: names, SSH keys, user data and metadata reach the
driver, secrets never come back, and bad values get clear 400s. The NoCloud seed and the
VMware guestinfo are checked as files. In-process, no root, no QEMU."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from goldclone.errors import CloneFailed
from goldclone.guest import hostkeys, identity
from goldclone.guest.config import GuestConfig
from goldclone.guest.nocloud import write_seed
from tests.conftest import ssh_key
from tests.fast.conftest import Service
from tests.servers import CallbackReceiver

USER_DATA = "#!/bin/sh\necho user-data-secret-7f3a > /www/hello.txt\n"
METADATA = {"coordinator": "metadata-secret-c0ffee", "job.token": "metadata-secret-t0ken"}
SECRETS = ("user-data-secret-7f3a", "metadata-secret-c0ffee", "metadata-secret-t0ken")


def public_key(folder: Path, name: str = "key") -> str:
    return ssh_key(folder, f"{name}@test")[1]


async def test_the_guest_is_told_everything_and_no_secret_comes_back(
    service: Service,
    request_body: dict[str, Any],
    callbacks: CallbackReceiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = public_key(tmp_path)
    body = {**request_body, "name": "builder-1", "ssh_authorized_keys": [key],
            "user_data": USER_DATA, "metadata": METADATA,
            "callback_url": callbacks.url}  # fmt: skip
    vm = await service.boot(body)
    assert vm["status"] == "running", vm
    assert (vm["name"], vm["hostname"], vm["ssh_authorized_keys"]) == (
        "builder-1",
        "builder-1",
        [key],
    )
    assert vm["user_data_sha256"] == hashlib.sha256(USER_DATA.encode()).hexdigest()
    assert vm["metadata_keys"] == ["coordinator", "job.token"]
    spec = service.host.machines[vm["id"]].spec
    assert spec is not None
    assert spec.guest == GuestConfig(vm["id"], "builder-1", (key,), USER_DATA, METADATA)
    assert all(secret not in repr(spec) for secret in SECRETS)

    [callback] = await asyncio.to_thread(callbacks.wait_for, 1, 5)
    seen = [
        (await service.client.get(f"/vms/{vm['id']}")).text,
        (await service.client.get("/vms")).text,
        json.dumps(callback),
        *(record.getMessage() for record in caplog.records),
        *(  # the store included: secrets are only ever in memory, and in the VM's seed
            path.read_bytes().decode(errors="replace")
            for path in service.settings.data_dir.rglob("*")
            if path.is_file()
        ),
    ]
    for secret in SECRETS:
        assert not [text for text in seen if secret in text], secret
    await service.delete(vm["id"])


async def test_without_a_name_the_hostname_comes_from_the_id(
    service: Service, request_body: dict[str, Any]
) -> None:
    vm = await service.boot(request_body)
    assert vm["name"] is None and vm["hostname"] == "vm-" + vm["id"].split("-")[0]
    assert (vm["ssh_authorized_keys"], vm["user_data_sha256"], vm["metadata_keys"]) == (
        [],
        None,
        [],
    )
    spec = service.host.machines[vm["id"]].spec
    assert spec is not None and spec.guest.user_data is None and spec.guest.metadata == {}


async def test_a_name_is_unique_among_the_vms_that_exist(
    service: Service, request_body: dict[str, Any]
) -> None:
    first = await service.boot({**request_body, "name": "builder-1"})
    response = await service.client.post("/vms", json={**request_body, "name": "builder-1"})
    assert response.status_code == 409
    assert response.json()["code"] == "name-conflict"
    assert first["id"] in response.json()["message"]
    # a VM in error still exists, and keeps its name until it is deleted
    service.host.fail_next("clone", CloneFailed("no room"))
    failed = await service.boot({**request_body, "name": "builder-2"})
    assert failed["status"] == "error"
    again = await service.client.post("/vms", json={**request_body, "name": "builder-2"})
    assert again.json()["code"] == "name-conflict"
    for vm in (first, failed):
        await service.delete(vm["id"])
    reused = await service.boot({**request_body, "name": "builder-1"})
    assert reused["status"] == "running" and reused["hostname"] == "builder-1"


async def test_concurrent_creates_of_one_name_make_one_vm(
    service: Service, request_body: dict[str, Any]
) -> None:
    body = {**request_body, "name": "only-one"}
    answers = await asyncio.gather(*(service.client.post("/vms", json=body) for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [202] + [409] * 5


async def test_bad_guest_configuration_is_refused_clearly(
    service: Service, request_body: dict[str, Any], tmp_path: Path
) -> None:
    key = public_key(tmp_path)
    kind, data, _ = key.split(" ", 2)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "-builder"}, "name: must be a DNS label"),
        ({"name": "Builder"}, "name: must be a DNS label"),
        ({"name": "b" * 64}, "name: must be a DNS label"),
        ({"name": "a_b"}, "name: must be a DNS label"),
        ({"ssh_authorized_keys": [key, "not a key"]}, "ssh_authorized_keys.1: is not an OpenSSH"),
        ({"ssh_authorized_keys": [f"{kind} {data[:-8]}"]}, "ssh_authorized_keys.0: is not an Open"),
        ({"ssh_authorized_keys": [f"ssh-rsa {data}"]}, "is not a ssh-rsa key"),
        ({"ssh_authorized_keys": ["ssh-ed25519"]}, "ssh_authorized_keys.0: is not an OpenSSH"),
        ({"user_data": "#!/bin/sh\n" + "x" * 32 * 1024}, "user_data: "),
        ({"user_data": "#!/bin/sh\n" + "é" * 16 * 1024}, "user_data: is 32778 bytes"),
        ({"user_data": "echo secret-script"}, "user_data: must be a #cloud-config document or"),
        ({"metadata": {"Bad Key": "v"}}, "metadata.Bad Key"),
        ({"metadata": {"metadata.encoding": "v"}}, "metadata: key 'metadata.encoding' is reserved"),
        ({"metadata": {"userdata": "v"}}, "is reserved"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "metadata: "),
        ({"metadata": {"big": "v" * 4096}}, "at most 4096 are allowed"),
        ({"metadata": {"n": 1}}, "metadata.n: "),
    ]
    for fields, expected in cases:
        response = await service.client.post("/vms", json={**request_body, **fields})
        assert response.status_code == 400, (fields, response.text)
        answer = response.json()
        assert answer["code"] == "invalid-request" and expected in answer["message"], answer
        assert "secret-script" not in answer["message"] and "v" * 100 not in answer["message"]
    assert (await service.client.get("/vms")).json()["vms"] == []


def test_the_nocloud_seed_holds_what_cloud_init_reads(tmp_path: Path) -> None:
    guest = GuestConfig("282ee68a", "builder-1", ("ssh-ed25519 AAAA me",), USER_DATA, METADATA)
    seed = tmp_path / "seed.iso"
    write_seed(seed, guest, "52:54:00:12:34:56")
    assert seed.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # no partial file left
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"

        def read(name: str) -> bytes:
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            joliet = io.BytesIO()
            iso.get_file_from_iso_fp(joliet, joliet_path=f"/{name}")
            assert out.getvalue() == joliet.getvalue()
            return out.getvalue()

        meta = json.loads(read("meta-data"))
        assert meta == {
            "instance-id": "282ee68a", "local-hostname": "builder-1",
            "public-keys": ["ssh-ed25519 AAAA me"], "goldclone_metadata": METADATA,
        }  # fmt: skip
        assert read("user-data").decode() == USER_DATA
        network = json.loads(read("network-config"))
        [nic] = network["ethernets"].values()
        assert network["version"] == 2 and nic["match"] == {"macaddress": "52:54:00:12:34:56"}
        assert nic["dhcp4"] is True
    finally:
        iso.close()


async def test_the_largest_valid_configuration_fits_in_a_request(
    service: Service, request_body: dict[str, Any], tmp_path: Path
) -> None:
    key = public_key(tmp_path)
    keys = [f"{key} {'c' * (2048 - len(key) - 1)}"] * 16
    user_data = "#!/bin/sh\n" + "x" * (32 * 1024 - 10)
    metadata = {f"k{i:02d}": "v" * 61 for i in range(64)}  # 64 entries, 4096 bytes
    body = {**request_body, "ssh_authorized_keys": keys, "user_data": user_data,
            "metadata": metadata}  # fmt: skip
    response = await service.client.post("/vms", json=body)
    assert response.status_code == 202, response.text[:300]
    assert len(response.json()["metadata_keys"]) == 64


def test_a_restored_guest_is_told_its_identity_in_files_for_its_default_user() -> None:
    passwd = "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n" \
             "debian:x:1000:1000:Debian:/home/debian:/bin/bash\n"  # fmt: skip
    account = identity.default_account(passwd)
    assert account == identity.Account("debian", "/home/debian")
    assert identity.default_account("") == identity.Account("root", "/root")
    guest = GuestConfig("id", "job-7", ("ssh-ed25519 AAAA a", "ssh-rsa BBBB b"),
                        "#!/bin/sh\necho hi\n", {"token": "s3cret"})  # fmt: skip
    written = {file.path: file.content for file in identity.files(guest, account)}
    assert written == {
        "/proc/sys/kernel/hostname": "job-7\n",
        "/etc/hostname": "job-7\n",
        "/home/debian/.ssh/authorized_keys": "ssh-ed25519 AAAA a\nssh-rsa BBBB b\n",
        "/run/goldclone/metadata.json": '{"token": "s3cret"}',
        "/run/goldclone/user-data": "#!/bin/sh\necho hi\n",
    }
    assert identity.user_data_script(guest) == (
        "/run/goldclone/user-data > /run/goldclone/user-data.log 2>&1 &"
    )
    plain = GuestConfig("id", "job-8")
    assert "/run/goldclone/user-data" not in {f.path for f in identity.files(plain, account)}
    assert identity.user_data_script(plain) is None
    keys = [hostkeys.HostKey("ed25519", "PRIVATE\n", "ssh-ed25519 PUBLIC\n")]
    script = identity.new_machine_script(account, keys, b"\x00\xff", 1_796_000_000_123_456_789)
    assert "printf '\\000\\377' > /dev/urandom" in script
    assert "date -u -s @1796000000.123456789 " in script
    assert "s3cret" not in script and ": > /home/debian/.ssh/authorized_keys" in script
    assert "chown -R debian /home/debian/.ssh" in script
    assert "printf '%s' 'PRIVATE\n' > /etc/ssh/ssh_host_ed25519_key" in script


def test_host_keys_are_made_in_openssh_formats_that_ssh_keygen_reads(tmp_path: Path) -> None:
    made = hostkeys.new_host_keys()
    assert [key.kind for key in made] == ["rsa", "ecdsa", "ed25519"]
    for key in made:
        private = tmp_path / f"{key.kind}_key"
        private.write_text(key.private)
        private.chmod(0o600)
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
        assert derived.split()[:2] == key.public.split()[:2]
    assert len({key.public for key in hostkeys.new_host_keys()} | {k.public for k in made}) == 6
