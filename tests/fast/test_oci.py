"""Images from a real OCI registry (Debian's docker-registry, tests/registry.py) on loopback:
KubeVirt's containerDisk and goldclone's chunked disk artifact, by tag and by digest, over
plain HTTP and TLS, anonymous, with basic auth and with bearer tokens; what a registry may do
wrong (a tampered blob, a death mid-blob) and what a new version costs."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from goldclone.settings import Limits, Settings
from tests.fast.conftest import Service, as_, serving, settings_on, tokens
from tests.postgres import PostgresCluster
from tests.registry import (
    Registry,
    Served,
    client,
    push_artifact,
    push_image,
    running_registry,
)
from tests.servers import FileServer

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def raw_disk(size: int, seed: int) -> bytes:
    """A raw disk the image checks take (an MBR signature), of bytes that do not compress."""
    data = bytearray(hashlib.shake_256(seed.to_bytes(4, "big")).digest(size))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def container_disk(disk: bytes, *, name: str = "disk/disk.img", link: bool = False) -> bytes:
    """A containerDisk's one layer: the disk under /disk/, as KubeVirt's images have it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        folder = tarfile.TarInfo("disk")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        if link:
            sneaky = tarfile.TarInfo("disk/sneaky")
            sneaky.type, sneaky.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(sneaky)
        member = tarfile.TarInfo(name)
        member.size = len(disk)
        tar.addfile(member, io.BytesIO(disk))
    return gzip.compress(out.getvalue(), mtime=0)


def push_container_disk(registry: Registry, repo: str, tag: str, disk: bytes, **kw: Any) -> str:
    with client(registry) as http:
        return push_image(
            http, repo, tag, [container_disk(disk, **kw)], layer_type=GZIP_LAYER
        ).digest


def on(settings: Settings, registry: Registry, **changes: Any) -> Settings:
    insecure = () if registry.url.startswith("https") else (registry.host,)
    return replace(settings, registry_insecure=insecure, **changes)


def body(reference: str) -> dict[str, Any]:
    return {"image": {"oci": reference}, "cpus": 1, "memory": 256}


async def images(service: Service) -> list[dict[str, Any]]:
    return (await service.client.get("/images")).json()["images"]


async def test_a_container_disk_by_tag_and_by_digest_is_one_gold_image_fetched_once(
    fast_settings: Settings, tmp_path: Path
) -> None:
    disk = raw_disk(256 << 10, 1)
    with running_registry(tmp_path) as registry:
        digest = push_container_disk(registry, "disks/demo", "v1", disk)
        async with serving(Service(on(fast_settings, registry))) as service:
            by_tag = await service.boot(body(f"{registry.host}/disks/demo:v1"))
            assert by_tag["status"] == "running"
            assert by_tag["image"] == {"oci": f"{registry.host}/disks/demo:v1@{digest}"}
            by_digest = await service.boot(body(f"{registry.host}/disks/demo@{digest}"))
            assert by_digest["status"] == "running" and by_digest["image_from_cache"] is True
            (image,) = await images(service)
            identity = hashlib.sha256(disk).hexdigest()
            assert image["id"] == f"sha256-{identity}" and image["disk_sha256"] == identity
            assert image["oci"] == f"{registry.host}/disks/demo:v1@{digest}" and image["vms"] == 2
            assert (await service.client.get(f"/images/oci-{digest[7:]}")).json()["id"] == image[
                "id"
            ]
        assert len(registry.blob_gets()) == 1  # the layer, once
        assert not list((fast_settings.data_dir / "downloads").iterdir())


async def test_the_same_disk_by_url_and_by_registry_is_one_gold_image(
    fast_settings: Settings, tmp_path: Path, images: FileServer, request_body: dict[str, Any]
) -> None:
    disk = (images.root / "disk.raw").read_bytes()
    with running_registry(tmp_path) as registry:
        push_container_disk(registry, "disks/same", "v1", disk)
        async with serving(Service(on(fast_settings, registry))) as service:
            by_url = await service.boot(request_body)
            by_registry = await service.boot(body(f"{registry.host}/disks/same:v1"))
            assert by_registry["status"] == "running"
            (image,) = await images_of(service)
            assert image["id"] == f"sha256-{hashlib.sha256(disk).hexdigest()}" and image["vms"] == 2
            assert image["url"] == by_url["image"]["url"]


async def images_of(service: Service) -> list[dict[str, Any]]:
    return await images(service)


async def test_a_moved_tag_gives_new_vms_its_new_disk_and_a_pool_only_when_put_again(
    fast_settings: Settings, tmp_path: Path
) -> None:
    first, second = raw_disk(64 << 10, 2), raw_disk(64 << 10, 3)
    with running_registry(tmp_path) as registry:
        old = push_container_disk(registry, "disks/moving", "stable", first)
        reference = f"{registry.host}/disks/moving:stable"
        async with serving(Service(on(fast_settings, registry))) as service:
            pool = await service.put_pool("p", {**body(reference), "size": 1})
            assert pool["image"] == {"oci": f"{reference}@{old}"}
            await service.wait_pool("p", 1)
            new = push_container_disk(registry, "disks/moving", "stable", second)
            claimed = await service.boot(body(reference))  # a pool names the tag: its digest
            assert claimed["image"] == {"oci": f"{reference}@{old}"} and claimed["pool"] == "p"
            pool = await service.put_pool("p", {**body(reference), "size": 1})
            assert pool["image"] == {"oci": f"{reference}@{new}"}
            await service.client.delete("/pools/p")
            fresh = await service.boot(body(reference))
            assert fresh["image"] == {"oci": f"{reference}@{new}"}
            ids = {image["disk_sha256"] for image in await images(service)}
            assert ids == {hashlib.sha256(d).hexdigest() for d in (first, second)}


async def test_a_tampered_blob_is_refused_and_nothing_of_it_is_kept(
    fast_settings: Settings, tmp_path: Path
) -> None:
    with running_registry(tmp_path) as registry:
        with client(registry) as http:
            pushed = push_image(http, "disks/bad", "v1", [container_disk(raw_disk(64 << 10, 4))],
                                layer_type=GZIP_LAYER)  # fmt: skip
        (layer,) = pushed.layers
        data = next(registry.storage.rglob(f"blobs/sha256/*/{layer[7:]}/data"))
        tampered = bytearray(data.read_bytes())
        tampered[len(tampered) // 2] ^= 0xFF
        data.write_bytes(bytes(tampered))
        async with serving(Service(on(fast_settings, registry))) as service:
            vm = await service.post_vm(body(f"{registry.host}/disks/bad:v1"))
            failed = await service.wait_for(vm["id"], "error")
            assert failed["error"]["code"] == "checksum-mismatch", failed["error"]
            assert layer in failed["error"]["message"]
        assert not list((fast_settings.data_dir / "downloads").iterdir())
        assert [p.name for p in (fast_settings.data_dir / "images").iterdir()] == []


async def test_a_pull_cut_mid_blob_by_a_dying_registry_resumes_where_it_stopped(
    fast_settings: Settings, tmp_path: Path
) -> None:
    disk = raw_disk(4 << 20, 5)
    with running_registry(tmp_path, proxy=True) as registry:
        push_container_disk(registry, "disks/big", "v1", disk)
        registry.cut_blob_after(1 << 20)
        async with serving(Service(on(fast_settings, registry))) as service:
            vm = await service.post_vm(body(f"{registry.host}/disks/big:v1"))
            failed = await service.wait_for(vm["id"], "error")
            assert failed["error"]["code"] == "download-failed", failed["error"]
            assert registry.pid is None
            registry.start()
            again = await service.boot(body(f"{registry.host}/disks/big:v1"))
            assert again["status"] == "running"
        resumed = [s for s in registry.blob_gets() if s.status == 206]
        assert len(resumed) == 1 and resumed[0].written < len(container_disk(disk))


async def test_a_new_version_of_a_disk_artifact_fetches_only_the_chunks_that_changed(
    fast_settings: Settings, tmp_path: Path
) -> None:
    chunk, size = 1 << 20, 10 << 20
    first = tmp_path / "v1.raw"
    first.write_bytes(raw_disk(size, 6))
    second = tmp_path / "v2.raw"
    changed = bytearray(first.read_bytes())
    changed[3 * chunk : 4 * chunk] = raw_disk(chunk, 7)  # 10 % of the disk
    second.write_bytes(bytes(changed))
    with running_registry(tmp_path) as registry:
        push_artifact(registry, "disks/chunked", "v1", first, chunk)
        push_artifact(registry, "disks/chunked", "v2", second, chunk)
        async with serving(Service(on(fast_settings, registry))) as service:
            assert (await service.boot(body(f"{registry.host}/disks/chunked:v1")))[
                "status"
            ] == "running"
            before = len(registry.blob_gets())
            vm = await service.boot(body(f"{registry.host}/disks/chunked:v2"))
            assert vm["status"] == "running"
            fetched = registry.blob_gets()[before:]
            identities = {image["disk_sha256"] for image in await images(service)}
        assert identities == {hashlib.sha256(d.read_bytes()).hexdigest() for d in (first, second)}
        layers = [s for s in fetched if s.written > 4096]  # not the config
        assert len(layers) == 1 and layers[0].written < 1.1 * chunk, fetched


@pytest.mark.parametrize("tls,auth", [(False, "basic"), (True, None), (True, "token")])
async def test_registries_over_tls_with_basic_auth_or_tokens(
    fast_settings: Settings, tmp_path: Path, tls: bool, auth: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    disk = raw_disk(64 << 10, 8)
    with running_registry(tmp_path, tls=tls, auth=auth) as registry:  # type: ignore[arg-type]
        push_container_disk(registry, "team/disk", "v1", disk)
        reference = f"{registry.host}/team/disk:v1"
        settings = on(fast_settings, registry, registry_ca_file=registry.ca_file)
        if auth is not None:
            async with serving(Service(settings)) as service:  # no credentials
                refused = await service.client.post("/vms", json=body(reference))
                assert refused.status_code == 502, refused.text
                assert refused.json()["code"] == "registry-unavailable"
            assert registry.username and registry.password
            if auth == "token":  # in a Docker-style auth file
                secrets = tmp_path / "auth.json"
                pair = base64.b64encode(f"{registry.username}:{registry.password}".encode())
                secrets.write_text(json.dumps({"auths": {registry.host: {"auth": pair.decode()}}}))
                settings = replace(settings, registry_auth_file=secrets)
            else:  # in the settings
                given = ((registry.host, registry.username, registry.password),)
                settings = replace(settings, registry_credentials=given)
        caplog.set_level(logging.DEBUG)
        async with serving(Service(settings)) as service:
            vm = await service.boot(body(reference))
            assert vm["status"] == "running"
            shown = json.dumps(await images(service))
        if auth is not None:
            assert registry.password not in caplog.text and registry.password not in shown
        if auth == "token":
            assert registry.tokens_issued >= 1


async def test_a_registry_is_reached_over_plain_http_only_when_listed_as_insecure(
    fast_settings: Settings, tmp_path: Path
) -> None:
    with running_registry(tmp_path) as registry:
        push_container_disk(registry, "disks/plain", "v1", raw_disk(64 << 10, 9))
        async with serving(Service(fast_settings)) as service:
            refused = await service.client.post(
                "/vms", json=body(f"{registry.host}/disks/plain:v1")
            )
            assert refused.status_code == 502 and refused.json()["code"] == "registry-unavailable"
            unknown = await service.client.post("/vms", json=body("169.254.169.254:80/x/y:v1"))
            assert unknown.status_code == 400 and unknown.json()["message"].startswith("image.oci:")


@pytest.mark.parametrize("what", ["two layers", "a link", "no disk"])
async def test_a_layer_that_is_no_container_disk_is_refused(
    fast_settings: Settings, tmp_path: Path, what: str
) -> None:
    disk = raw_disk(64 << 10, 10)
    with running_registry(tmp_path) as registry:
        with client(registry) as http:
            layers = {"two layers": [container_disk(disk), container_disk(disk, name="disk/b.img")],
                      "a link": [container_disk(disk, link=True)],
                      "no disk": [container_disk(disk, name="elsewhere.img")]}[what]  # fmt: skip
            push_image(http, "disks/odd", "v1", layers, layer_type=GZIP_LAYER)
        async with serving(Service(on(fast_settings, registry))) as service:
            vm = await service.post_vm(body(f"{registry.host}/disks/odd:v1"))
            failed = await service.wait_for(vm["id"], "error")
        code = {
            "two layers": "image-unsupported",
            "a link": "image-unsafe",
            "no disk": "image-unsupported",
        }[what]
        assert failed["error"]["code"] == code, failed["error"]
        assert not os.listdir(fast_settings.data_dir / "downloads")


async def test_a_tenant_gets_a_cached_registry_image_only_from_a_repository_that_has_it(
    tmp_path: Path, database_url: str
) -> None:
    """A tenant that names another's pulled image by its digest gets it from the cache only
    through a repository that serves that manifest: elsewhere its VM fails as a pull would."""
    disk = raw_disk(64 << 10, 11)
    with running_registry(tmp_path) as registry:
        digest = push_container_disk(registry, "team-a/disk", "v1", disk)
        push_container_disk(registry, "team-b/disk", "v1", disk)  # the same manifest
        settings = replace(settings_on(tmp_path, database_url), tokens=tokens())
        async with serving(Service(on(settings, registry))) as service:

            async def create(name: str, reference: str) -> dict[str, Any]:
                get = service.client.get
                posted = await service.client.post("/vms", json=body(reference), headers=as_(name))
                assert posted.status_code == 202, posted.text
                url = f"/vms/{posted.json()['id']}"
                while (vm := (await get(url, headers=as_(name))).json())["status"] == "creating":
                    await asyncio.sleep(service.poll)
                return vm

            async def listed(name: str) -> list[str]:
                found = (await service.client.get("/images", headers=as_(name))).json()["images"]
                return [image["id"] for image in found]

            alices = await create("alice", f"{registry.host}/team-a/disk:v1")
            assert alices["status"] == "running" and await listed("bob") == []
            missing = await create("bob", f"{registry.host}/team-c/disk@{digest}")
            assert (missing["status"], missing["error"]["code"]) == ("error", "download-failed")
            assert await listed("bob") == []
            bobs = await create("bob", f"{registry.host}/team-b/disk@{digest}")
            assert bobs["status"] == "running" and bobs["image_from_cache"] is True
            assert await listed("bob") == await listed("alice") != []


async def test_a_vm_made_into_an_image_and_pushed_starts_vms_on_another_host(
    tmp_path: Path, database_url: str, request_body: dict[str, Any]
) -> None:
    """A VM's disk becomes a gold image (the VM stops and stays), pushed as a disk artifact;
    this host names it by the pushed reference at once, another host pulls it by its tag;
    a second push of it sends no chunk the repository has."""
    with running_registry(tmp_path) as registry:
        first = on(settings_on(tmp_path / "a", database_url), registry)
        # another host, with a store of its own
        second = on(replace(settings_on(tmp_path / "b", database_url), database_url=None), registry)
        reference = f"{registry.host}/ci/base:v1"
        async with serving(Service(first)) as here:
            vm = await here.boot(request_body)
            build = {"name": "ci base", "push": reference, "chunk_mb": 1}
            made = await here.client.post(f"/vms/{vm['id']}/image", json=build)
            assert made.status_code == 201, made.text
            image = made.json()
            assert image["name"] == "ci base" and image["oci"].startswith(f"{reference}@sha256:")
            assert image["id"] == f"sha256-{image['disk_sha256']}"
            stopped = (await here.client.get(f"/vms/{vm['id']}")).json()
            assert stopped["status"] == "stopped" and "gold image" in stopped["status_reason"]
            again = await here.boot(body(image["oci"]))
            assert again["image_from_cache"] is True and again["status"] == "running"
            uploads = len(blob_puts(registry))
            push = {"oci": f"{registry.host}/ci/base:v2", "chunk_mb": 1}
            pushed = await here.client.post(f"/images/{image['id']}/push", json=push)
            assert pushed.status_code == 200, pushed.text
            assert pushed.json()["oci"].split("@")[1] == image["oci"].split("@")[1]
            assert len(blob_puts(registry)) == uploads
            refused = await here.client.post(
                f"/vms/{vm['id']}/image", json={"name": "x", "push": image["oci"]}
            )
            assert refused.status_code == 400 and "tag" in refused.json()["message"]
        async with serving(Service(second)) as there:
            elsewhere = await there.boot(body(reference))
            assert elsewhere["status"] == "running" and elsewhere["image_from_cache"] is False
            (pulled,) = await images(there)
            assert pulled["disk_sha256"] == image["disk_sha256"]
            disk = next((second.data_dir / "images").glob("sha256-*/content/*"))
            assert vm["id"].encode() in disk.read_bytes()[512:1024]  # what the first VM wrote


def blob_puts(registry: Registry) -> list[Served]:
    return [r for r in registry.requests() if r.method == "PUT" and "/blobs/" in r.path]


async def test_two_hosts_of_a_fleet_pull_the_same_digest_each_once(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """A tag is pinned once for the fleet: the host that holds the image gets the next create
    of it while it has room; the other pulls the same digest when it must."""
    fleet = await postgres.new_database()
    disk = raw_disk(64 << 10, 12)
    with running_registry(tmp_path) as registry:
        digest = push_container_disk(registry, "fleet/disk", "v1", disk)

        def host(name: str) -> Service:
            settings = replace(settings_on(tmp_path / name, fleet), host_id=name,
                               limits=Limits(max_vms=2))  # fmt: skip
            return Service(on(settings, registry))

        async with serving(host("host-a")) as a, serving(host("host-b")) as b:
            reference = f"{registry.host}/fleet/disk:v1"
            first = await b.boot(body(reference))  # b is asked, and is as empty as a
            assert first["host"] == "host-b"
            second = await a.boot(body(reference))  # a is emptier, but b holds the image
            assert (second["host"], second["image_from_cache"]) == ("host-b", True)
            third = await a.boot(body(reference))  # b is full
            assert (third["host"], third["image_from_cache"]) == ("host-a", False)
            pinned = {vm["image"]["oci"] for vm in (first, second, third)}
            assert pinned == {f"{reference}@{digest}"}
            held = {
                (await s.client.get("/images")).json()["images"][0]["disk_sha256"] for s in (a, b)
            }
            assert held == {hashlib.sha256(disk).hexdigest()}
        assert len(registry.blob_gets()) == 2  # each host's one pull


async def test_more_pulls_at_once_than_the_loop_has_worker_threads_all_finish(
    fast_settings: Settings, tmp_path: Path
) -> None:
    """Each layer is unpacked as it arrives by a thread of its own: were the unpacking in the
    loop's shared pool (6 threads on 2 cores), eight waiting readers would hold every thread
    that the downloads' writes need."""
    with running_registry(tmp_path) as registry:
        references = []
        for n in range(8):
            push_container_disk(registry, f"many/disk{n}", "v1", raw_disk(1 << 20, 100 + n))
            references.append(f"{registry.host}/many/disk{n}:v1")
        async with serving(Service(on(fast_settings, registry))) as service:
            posted = await asyncio.gather(*(
                service.client.post("/images", json={"oci": reference}) for reference in references
            ))  # fmt: skip
            assert {answer.status_code for answer in posted} == {202}
            async with asyncio.timeout(60):
                while {image["status"] for image in await images(service)} != {"ready"}:
                    await asyncio.sleep(service.poll)
            assert len(await images(service)) == 8
