"""The OCI distribution API as goldclone speaks it: manifests by tag or digest, blobs by
digest (from an offset, to resume), and uploads for a push. Every request goes through the
service's outbound policy (so do token realms and blob redirects), over TLS unless the
operator lists the registry as insecure."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from goldclone.errors import DownloadFailed, ImageUnsupported, ManifestUnknown, StartFailed
from goldclone.images.oci.auth import Authorizer, Credentials, read_auth_file
from goldclone.images.oci.manifests import (
    ACCEPTED,
    INDEXES,
    MAX_MANIFEST,
    Manifest,
    parse_json,
    parse_manifest,
    pick_platform,
)
from goldclone.outbound.policy import OutboundPolicy, PolicyTransport
from goldclone.references import Reference
from goldclone.settings import Settings

PUSH = "pull,push"
"""The actions a push asks the registry's token service for."""


class Registry:
    def __init__(
        self,
        http: httpx.AsyncClient,
        auth: Authorizer,
        insecure: frozenset[str] = frozenset(),
        timeout: float = 30.0,
    ) -> None:
        self._http = http
        self._auth = auth
        self._insecure = insecure
        self._timeout = timeout

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, ref: Reference, path: str) -> str:
        scheme = "http" if ref.registry in self._insecure else "https"
        return f"{scheme}://{ref.registry}/v2/{ref.repository}/{path}"

    async def send(
        self, ref: Reference, request: httpx.Request, actions: str = "pull", stream: bool = False
    ) -> httpx.Response:
        """``request`` with the registry's authorization, asked for once if it challenges."""
        scope = f"repository:{ref.repository}:{actions}"
        if (header := self._auth.header(ref.registry, scope)) is not None:
            request.headers["Authorization"] = header
        response = await self._send(ref, request, stream)
        challenge = response.headers.get("WWW-Authenticate")
        if response.status_code != 401 or not challenge:
            return response
        await response.aclose()
        header = await self._auth.answer(ref.registry, scope, challenge, self._timeout)
        request.headers["Authorization"] = header
        response = await self._send(ref, request, stream)
        if response.status_code == 401:
            await response.aclose()
            raise DownloadFailed(
                f"registry {ref.registry} refused goldclone's credentials for {ref.repository}"
            )
        return response

    async def _send(self, ref: Reference, request: httpx.Request, stream: bool) -> httpx.Response:
        try:
            return await self._http.send(request, stream=stream, follow_redirects=True)
        except httpx.TimeoutException:
            raise DownloadFailed(
                f"registry {ref.registry} timed out (no answer for {self._timeout:g} s)"
            ) from None
        except httpx.HTTPError as exc:
            raise DownloadFailed(
                f"registry {ref.registry} failed: {exc or type(exc).__name__}"
            ) from None

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Request:
        return self._http.build_request(method, url, timeout=httpx.Timeout(self._timeout), **kwargs)  # type: ignore[arg-type]

    async def manifest(self, ref: Reference) -> Manifest:
        """The manifest ``ref`` names (through an index, the linux/amd64 one), its digest
        checked against the reference's."""
        digest, body, media_type = await self._manifest_bytes(ref, ref.manifest)
        found = parse_json(body)
        if media_type in INDEXES or found.get("mediaType") in INDEXES:
            entry = pick_platform(found)
            _, body, _ = await self._manifest_bytes(ref, entry.digest)
            digest, found = entry.digest, parse_json(body)
        return parse_manifest(digest, found)

    async def resolve(self, ref: Reference) -> str:
        """The digest of the manifest that ``ref``'s tag names now."""
        digest, _, _ = await self._manifest_bytes(ref, ref.manifest)
        return digest

    async def _manifest_bytes(self, ref: Reference, name: str) -> tuple[str, bytes, str]:
        request = self.request(
            "GET", self.url(ref, f"manifests/{name}"), headers={"Accept": ", ".join(ACCEPTED)}
        )
        response = await self.send(ref, request, stream=True)
        try:
            if response.status_code == 404:
                raise ManifestUnknown(
                    f"registry {ref.registry} has no manifest {name} in {ref.repository}"
                )
            if response.status_code != 200:
                raise DownloadFailed(
                    f"registry {ref.registry} answered HTTP {response.status_code} for manifest "
                    f"{name} of {ref.repository}"
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise ImageUnsupported(
                        f"the manifest {name} of {ref.repository} is over {MAX_MANIFEST} bytes"
                    )
        except httpx.HTTPError as exc:
            raise DownloadFailed(
                f"registry {ref.registry} failed: {exc or type(exc).__name__}"
            ) from None
        finally:
            await response.aclose()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if name.startswith("sha256:") and digest != name:
            raise DownloadFailed(
                f"registry {ref.registry} served manifest {name} of {ref.repository} with other "
                f"content (its digest is {digest})"
            )
        return digest, bytes(body), response.headers.get("Content-Type", "").split(";")[0]

    async def has_blob(self, ref: Reference, digest: str) -> bool:
        request = self.request("HEAD", self.url(ref, f"blobs/{digest}"))
        response = await self.send(ref, request, PUSH)
        return response.status_code == 200

    async def push_blob(self, ref: Reference, digest: str, data: bytes) -> None:
        """One blob, in a monolithic upload (a POST for its location, a PUT of its bytes)."""
        started = await self.send(ref, self.request("POST", self.url(ref, "blobs/uploads/")), PUSH)
        location = started.headers.get("Location")
        if started.status_code != 202 or not location:
            raise DownloadFailed(
                f"registry {ref.registry} answered HTTP {started.status_code} to an upload"
            )
        url = httpx.URL(self.url(ref, "")).join(location)
        url = url.copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        put = await self.send(
            ref, self.request("PUT", str(url), content=data, headers=headers), PUSH
        )
        if put.status_code != 201:
            raise DownloadFailed(
                f"registry {ref.registry} answered HTTP {put.status_code} to blob {digest}"
            )

    async def push_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        """The manifest put under ``ref``'s tag; its digest."""
        url = self.url(ref, f"manifests/{ref.tag or 'latest'}")
        request = self.request("PUT", url, content=body, headers={"Content-Type": media_type})
        response = await self.send(ref, request, PUSH)
        if response.status_code != 201:
            raise DownloadFailed(
                f"registry {ref.registry} answered HTTP {response.status_code} to the manifest"
            )
        return "sha256:" + hashlib.sha256(body).hexdigest()

    @asynccontextmanager
    async def blob(self, ref: Reference, digest: str, offset: int) -> AsyncIterator[httpx.Response]:
        """The response to a GET of a blob from ``offset`` (200: from its start; 206: from
        ``offset``); any other answer raises."""
        headers = {"Accept-Encoding": "identity"} | (
            {"Range": f"bytes={offset}-"} if offset else {}
        )
        request = self.request("GET", self.url(ref, f"blobs/{digest}"), headers=headers)
        response = await self.send(ref, request, stream=True)
        try:
            if response.status_code not in (200, 206):
                raise DownloadFailed(
                    f"registry {ref.registry} answered HTTP {response.status_code} for blob "
                    f"{digest} of {ref.repository}"
                )
            yield response
        finally:
            await response.aclose()


def open_registry(settings: Settings, policy: OutboundPolicy) -> Registry:
    """The registries as the operator's settings say to reach them (credentials given in the
    settings over the auth file's); ``StartFailed`` naming a file that cannot be read (never
    what it holds)."""
    auth_file, ca_file = settings.registry_auth_file, settings.registry_ca_file
    inline = settings.registry_credentials
    try:
        credentials = read_auth_file(auth_file) if auth_file is not None else {}
        credentials |= {host: Credentials(user, password) for host, user, password in inline}
        tls = ssl.create_default_context()
        if ca_file is not None:
            tls.load_verify_locations(cafile=str(ca_file))
    except (ValueError, OSError, ssl.SSLError) as exc:
        reason = (
            exc
            if isinstance(exc, ValueError)
            else f"cannot read {auth_file or ca_file}: {type(exc).__name__}"
        )
        raise StartFailed(f"registries: {reason}") from None
    transport = PolicyTransport(policy, httpx.AsyncHTTPTransport(verify=tls))
    http = httpx.AsyncClient(transport=transport)
    insecure = frozenset(settings.registry_insecure)
    return Registry(http, Authorizer(http, credentials), insecure, settings.download_timeout)
