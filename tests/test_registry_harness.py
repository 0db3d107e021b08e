"""The registry harness itself (tests/registry.py), against the real Distribution registry:
what later tests count on (pushes, pulls by tag and digest, the log of blob GETs, auth
refusing the anonymous, the cut mid-blob and a resume after it) must hold first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import httpx
import pytest

from tests.harness import processes_mentioning
from tests.registry import (
    OCI_MANIFEST,
    SERVICE,
    Served,
    client,
    push_image,
    running_registry,
    sha256_digest,
)

REPO = "goldclone/harness"

Auth = Literal[None, "basic", "token"]


@pytest.mark.parametrize(
    ("tls", "auth"),
    [(False, None), (True, None), (False, "basic"), (False, "token"), (True, "token")],
    ids=["plain", "tls", "basic", "token", "tls-token"],
)
def test_push_and_pull(tmp_path: Path, tls: bool, auth: Auth) -> None:
    layer = os.urandom(50_000)
    with running_registry(tmp_path, tls=tls, auth=auth) as registry:
        assert registry.url == f"{'https' if tls else 'http'}://{registry.host}"
        with client(registry) as http:
            pushed = push_image(http, REPO, "v1", [layer])
            for reference in ("v1", pushed.digest):
                got = http.get(
                    f"/v2/{REPO}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
                )
                assert got.status_code == 200, got.text
                assert got.content == pushed.manifest
                assert got.headers["Docker-Content-Digest"] == pushed.digest
            (layer_digest,) = pushed.layers
            blob = http.get(f"/v2/{REPO}/blobs/{layer_digest}")
            assert blob.status_code == 200
            assert sha256_digest(blob.content) == layer_digest
        assert registry.blob_gets() == [
            Served("GET", f"/v2/{REPO}/blobs/{layer_digest}", 200, len(layer))
        ]
        assert all(served.path != "/v2/" for served in registry.requests()), "probes are left out"

        if auth is not None:
            with client(registry, credentials=False) as anonymous:
                assert anonymous.get("/v2/").status_code == 401
                assert anonymous.get(f"/v2/{REPO}/blobs/{layer_digest}").status_code == 401
            last = registry.requests()[-1]  # the access log has the refusals too
            assert (last.method, last.path, last.status) == (
                "GET", f"/v2/{REPO}/blobs/{layer_digest}", 401
            )  # fmt: skip
        if auth == "token":
            assert registry.token_server is not None
            assert registry.tokens_issued >= 2  # the push, then the pulls
            assert f"repository:{REPO}:pull,push" in registry.token_server.scopes
            assert f"repository:{REPO}:pull" in registry.token_server.scopes
            wrong = httpx.get(
                registry.token_server.url,
                params={"service": SERVICE, "scope": f"repository:{REPO}:pull"},
                auth=(registry.token_server.username, "wrong"),
            )
            assert wrong.status_code == 401
            registry.token_server.refuse = True
            with client(registry) as refused:
                answer = refused.get(f"/v2/{REPO}/blobs/{layer_digest}")
                assert answer.status_code == 401
                assert str(answer.url).startswith(registry.token_server.url)
        if tls:
            assert registry.ca_file is not None
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"{registry.url}/v2/")
            by_name = registry.url.replace("127.0.0.1", "localhost")
            answer = httpx.get(f"{by_name}/v2/", verify=registry.ssl_context())
            assert answer.status_code == (401 if auth else 200)


def test_storage_outlives_a_restart(tmp_path: Path) -> None:
    """Also: its command line names the folder (the session's check of leftover processes
    finds it so), and it is gone when the context ends."""
    with running_registry(tmp_path) as registry, client(registry) as http:
        pushed = push_image(http, REPO, "v1", [b"layer"])
        first = registry.pid
        assert processes_mentioning(str(tmp_path)) == [first]
        registry.stop()
        assert registry.pid is None
        with pytest.raises(httpx.TransportError):
            http.get("/v2/")
        registry.start()
        assert registry.pid not in (None, first)
        got = http.get(f"/v2/{REPO}/manifests/{pushed.digest}", headers={"Accept": OCI_MANIFEST})
        assert got.content == pushed.manifest
    assert processes_mentioning(str(tmp_path)) == []


def test_cut_mid_blob_then_resume(tmp_path: Path) -> None:
    """The registry dies a MiB into a 4 MiB blob; back up, it serves the rest as a range."""
    layer = os.urandom(4 << 20)
    cut = 1 << 20
    with running_registry(tmp_path, proxy=True) as registry, client(registry) as http:
        pushed = push_image(http, REPO, "big", [layer])
        (digest,) = pushed.layers
        registry.cut_blob_after(cut)
        before = registry.pid
        assert before is not None
        got = bytearray()
        with (
            pytest.raises(httpx.RemoteProtocolError),
            http.stream("GET", f"/v2/{REPO}/blobs/{digest}") as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                got += chunk
        assert len(got) == cut
        assert registry.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(before, 0)  # gone and reaped

        registry.start()
        rest = http.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": f"bytes={len(got)}-"})
        assert rest.status_code == 206
        assert rest.headers["Content-Range"] == f"bytes {cut}-{len(layer) - 1}/{len(layer)}"
        assert sha256_digest(bytes(got) + rest.content) == digest
        assert registry.blob_gets()[-1] == Served(
            "GET", f"/v2/{REPO}/blobs/{digest}", 206, len(layer) - cut
        )
