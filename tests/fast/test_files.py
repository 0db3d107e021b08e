"""``/vms/{id}/files`` and ``goldclone cp`` over a real server on loopback, the synthetic
driver's guest being the real helper on this host (so guest paths are this host's, in the
test's own folder); and the client's refusal of a tar that reaches outside."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import httpx
import pytest

from goldclone.client.files import UnsafeArchive, unpack
from tests.fast.conftest import as_, goldclone_cli
from tests.harness import Goldclone, make_folder, tree


async def test_cp_copies_a_folder_and_its_modes_both_ways(
    helper_server: Goldclone, helper_vm: str, tmp_path: Path
) -> None:
    here = make_folder(tmp_path / "here")
    guest = tmp_path / "guest"
    guest.mkdir()
    up = await goldclone_cli(helper_server, "cp", str(here), f"{helper_vm}:{guest}/")
    assert up.returncode == 0, up.stderr
    assert tree(guest / "job") == tree(here)
    back = tmp_path / "back"
    back.mkdir()
    down = await goldclone_cli(helper_server, "cp", f"{helper_vm}:{guest}/job", str(back / "copy"))
    assert down.returncode == 0, down.stderr
    assert tree(back / "copy") == tree(here)
    single = await goldclone_cli(
        helper_server, "cp", f"{helper_vm}:{guest}/job/secret.key", str(back)
    )
    assert single.returncode == 0, single.stderr
    assert stat.S_IMODE((back / "secret.key").stat().st_mode) == 0o600


async def test_files_say_what_is_missing_or_wrong(
    helper_server: Goldclone, helper_vm: str, tmp_path: Path
) -> None:
    missing = await goldclone_cli(
        helper_server, "cp", f"{helper_vm}:{tmp_path}/nothing", str(tmp_path)
    )
    assert missing.returncode == 1 and b"path-not-found" in missing.stderr
    relative = await helper_server.client.get(f"/vms/{helper_vm}/files", params={"path": "etc"})
    assert relative.status_code == 400 and relative.json()["code"] == "invalid-request"
    where = {"path": str(tmp_path)}
    untyped = await helper_server.client.put(f"/vms/{helper_vm}/files", params=where, content=b"x")
    assert untyped.status_code == 415
    bad = await helper_server.client.put(f"/vms/{helper_vm}/files", params={"path": str(tmp_path)},
                                  content=b"not a tar" * 100,
                                  headers={"Content-Type": "application/x-tar"})  # fmt: skip
    assert bad.status_code == 400, bad.text
    assert bad.json()["message"].startswith(f"the archive was not extracted into {tmp_path}: ")
    nowhere = await goldclone_cli(
        helper_server, "cp", str(tmp_path), f"{helper_vm}:{tmp_path}/no/such/dir"
    )
    assert nowhere.returncode == 2 and b"was not extracted" in nowhere.stderr
    both_local = await goldclone_cli(helper_server, "cp", str(tmp_path), str(tmp_path))
    assert both_local.returncode == 2 and b"ID:PATH" in both_local.stderr


async def test_files_need_the_vms_tenant_and_a_user_token(
    helper_server: Goldclone, helper_vm: str, tmp_path: Path
) -> None:
    url = f"/vms/{helper_vm}/files"
    for who, status in (("bob", 404), ("alice-reader", 403)):
        response = await helper_server.client.get(
            url, params={"path": str(tmp_path)}, headers=as_(who)
        )
        assert response.status_code == status, who
    anonymous = httpx.AsyncClient(base_url=str(helper_server.client.base_url))
    async with anonymous:
        assert (await anonymous.get(url, params={"path": "/"})).status_code == 401


def hostile(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return out.getvalue()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "sibling", "device"])
def test_a_tar_from_the_guest_that_reaches_outside_is_refused_whole(
    tmp_path: Path, case: str
) -> None:
    """What a guest that replaced its own ``tar`` could send for ``cp ID:/x/job LOCAL``."""
    member = tarfile.TarInfo({"dotdot": "job/../../escaped", "absolute": "/tmp/escaped",
                              "symlink": "job/link", "sibling": "other/file",
                              "device": "job/dev"}[case])  # fmt: skip
    member.size = 4 if case in ("dotdot", "absolute", "sibling") else 0
    if case == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    if case == "device":
        member.type = tarfile.CHRTYPE
    target = tmp_path / "inside"
    target.mkdir()
    with pytest.raises(UnsafeArchive):
        unpack(iter([hostile(member, b"evil"[: member.size])]), "job", target)
    assert list(tmp_path.rglob("*")) == [target]  # nothing written, nothing left
