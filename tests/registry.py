"""A real OCI registry for the tests: Debian's ``docker-registry`` (CNCF Distribution 2.8),
with filesystem storage in a folder of the test's, over plain HTTP or TLS (a test CA), with no
auth, HTTP basic auth (htpasswd), or bearer tokens from a small token server of our own
(Debian ships none). An optional TCP proxy in front can cut a blob download midway and kill
the registry at that moment, for resume tests. The registry is always ended by its PID.

What Distribution 2.8.2 does, as seen here: with filesystem storage it serves blob bytes
itself (200, never a 307 redirect), and answers ``Range: bytes=N-`` with 206 and a
Content-Range. Its access log is gorilla/handlers' Combined Log Format on stdout, whatever
``log.formatter`` says: method, URI, status and bytes written for every request, 401s
included, but no Range header. Its JSON log (stderr) has a "response completed" line with
``http.response.status`` and ``http.response.written`` for the requests past auth only (a
401 is a warning there without a status), so ``requests()`` reads the access log.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from goldclone.images.oci.disk_artifact import config_descriptor, cut, manifest_json
from tests.servers import free_port

SERVICE = "goldclone-test-registry"
"""The registry's token service name: the ``aud`` of its tokens."""
ISSUER = "goldclone-test-token-server"
"""The ``iss`` of the tokens, which the registry checks."""
TOKEN_LIFETIME = 300
"""Seconds a token lasts (its ``expires_in``)."""

_PROBE_AGENT = "goldclone-tests-registry-probe"
"""The User-Agent of the readiness probe, whose requests ``requests()`` leaves out."""
_BLOB_PATH = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_ACCESS_LINE = re.compile(
    r'\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) '
    r'(?P<size>\d+|-) "(?:[^"\\]|\\.)*" "(?P<agent>(?:[^"\\]|\\.)*)"'
)
"""A line of Distribution's access log (gorilla/handlers' Combined Log Format)."""
_BLOB_GET_LINE = re.compile(
    rb"(?:^|\r\n)GET /v2/\S+/blobs/sha256:[0-9a-f]{64}(?:\?\S*)? HTTP/1\.1\r\n"
)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_START_TIMEOUT = 15.0
_STOP_GRACE = 5.0


BINARY = Path("/usr/bin/docker-registry")
"""Where Debian's docker-registry package puts Distribution's registry."""


def _binary() -> Path:
    if not BINARY.exists():
        pytest.fail("Distribution's registry is not installed: apt install docker-registry")
    return BINARY


@dataclass(frozen=True)
class Served:
    """One request that the registry answered, as its own log tells it. ``written`` is what it
    wrote to the socket, which for a download cut short can be more than the client read.
    The registry does not log the Range header: a 206 says a range was asked."""

    method: str
    path: str
    status: int
    written: int
    query: str = ""


# --- certificates and tokens -------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    server: bool = False,
) -> x509.Certificate:
    """A certificate valid from an hour ago for a day, self-signed when ``issuer`` is None."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt_es256(
    claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> str:
    """A JWT signed with ES256 by hand (no PyJWT needed). Its header carries the signing
    certificate in ``x5c``, which Distribution verifies against its ``rootcertbundle``."""
    chain = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    header = {"typ": "JWT", "alg": "ES256", "x5c": chain}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _access(scopes: list[str]) -> list[dict[str, Any]]:
    """The ``access`` claim granting every scope asked (``type:name:action,action``; a name
    may hold colons, so the type is before the first and the actions after the last)."""
    granted = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind and name:
            granted.append({"type": kind, "name": name, "actions": actions.split(",")})
    return granted


def _bcrypt(password: str) -> str:
    """A bcrypt hash for htpasswd, the only kind Distribution accepts, at the lowest cost (the
    registry checks it on every request): from the ``bcrypt`` module, Apache's ``htpasswd``,
    or the C library's crypt(3), whichever is here first."""
    try:
        import bcrypt  # type: ignore[import-not-found,unused-ignore]

        hashed: str = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        return hashed
    except ImportError:
        pass
    if tool := shutil.which("htpasswd"):
        out = subprocess.run([tool, "-nbBC", "4", "user", password], check=True,
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        return out.strip().split(":", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # removed in Python 3.13
        try:
            import crypt
        except ImportError:
            crypt = None  # type: ignore[assignment]
    if crypt is not None:
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if hashed and hashed.startswith("$2"):
            return hashed
    pytest.fail("no way to make a bcrypt hash for htpasswd: pip install bcrypt (the dev extra)")


# --- the token server --------------------------------------------------------------------


class TokenServer:
    """The Docker token protocol on loopback, in this process: ``GET /token?service=&scope=``
    with the registry's user in HTTP Basic answers a JWT granting every scope asked; no or
    wrong credentials, or ``refuse`` set, answer 401. Plain HTTP even when the registry has
    TLS: the registry never calls it, only clients do, and on loopback."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.refuse = False
        """Set to answer 401 to every request, right credentials or not."""
        self.tokens_issued = 0
        self.scopes: list[str] = []
        """Every scope asked for, in order, granted or not."""
        self.denied = 0
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _certificate("goldclone test token signer", self._key, None, ca=True)
        self._server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def _answer(self, query: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        asked = parse_qs(query)
        scopes = [one for value in asked.get("scope", []) for one in value.split()]
        expected = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        with self._lock:
            self.scopes.extend(scopes)
            if (
                self.refuse
                or authorization is None
                or not secrets.compare_digest(authorization.encode(), expected.encode())
            ):
                self.denied += 1
                return 401, {
                    "errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]
                }
            if asked.get("service", [SERVICE]) != [SERVICE]:
                self.denied += 1
                return 400, {"errors": [{"code": "DENIED", "message": "unknown service"}]}
            self.tokens_issued += 1
        now = int(time.time())
        claims = {
            "iss": ISSUER, "sub": self.username, "aud": SERVICE, "exp": now + TOKEN_LIFETIME,
            "nbf": now, "iat": now, "jti": secrets.token_hex(16), "access": _access(scopes),
        }  # fmt: skip
        token = _jwt_es256(claims, self._key, self.certificate)
        issued = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat()
        return 200, {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME,
                     "issued_at": issued}  # fmt: skip


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: TokenServer


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenHTTPServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            status, body = 404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]}
        else:
            status, body = self.server.owner._answer(url.query, self.headers.get("Authorization"))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", f'Basic realm="{ISSUER}"')
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


# --- the cutting proxy -------------------------------------------------------------------


class _CutProxy:
    """A TCP relay on loopback in front of the registry, which can cut the next blob download:
    once armed, the first blob GET answered 200 or 206 on any connection gets ``nbytes`` of
    its body, then ``on_cut`` runs (it kills the registry) and the connection closes. It reads
    the HTTP it relays, so it cannot work with TLS. While the registry is down it accepts
    connections and closes them at once (a client sees no answer, not a refusal)."""

    def __init__(self, upstream_port: int, on_cut: Callable[[], None]) -> None:
        self._upstream = upstream_port
        self._on_cut = on_cut
        self._armed: int | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> None:
        self._accepting.start()

    def arm(self, nbytes: int) -> None:
        with self._lock:
            self._armed = nbytes

    def close(self) -> None:
        """Wake every relay thread (the stop socket turns readable), join them, close all."""
        self._stop_writer.close()
        self._accepting.join(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)
        self._listener.close()
        self._stop_reader.close()

    def _is_armed(self) -> bool:
        with self._lock:
            return self._armed is not None

    def _take(self) -> int | None:
        with self._lock:
            nbytes, self._armed = self._armed, None
            return nbytes

    def _accept(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._stop_reader, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._stop_reader in ready:
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue  # the client gave up before we took it
                self._threads = [thread for thread in self._threads if thread.is_alive()]
                thread = threading.Thread(target=self._relay_closing, args=(client,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _relay_closing(self, client: socket.socket) -> None:
        with client:
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream), timeout=5)
            except OSError:
                return
            with upstream:
                upstream.settimeout(None)
                with contextlib.suppress(OSError):
                    self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        blob_get = False  # the client sent a blob GET whose answer has not started
        head = b""  # the answer's header block so far, held back until it is whole
        left: int | None = None  # body bytes to pass before the cut
        open_ends = 2
        with selectors.DefaultSelector() as selector:
            for side in (client, upstream, self._stop_reader):
                selector.register(side, selectors.EVENT_READ)
            while open_ends:
                for key, _ in selector.select():
                    sock = key.fileobj
                    if sock is self._stop_reader:
                        return
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(1 << 16)
                    other = upstream if sock is client else client
                    if not data:
                        selector.unregister(sock)
                        other.shutdown(socket.SHUT_WR)
                        open_ends -= 1
                        continue
                    if sock is client:
                        if self._is_armed() and _BLOB_GET_LINE.search(data):
                            blob_get, head = True, b""
                        upstream.sendall(data)
                        continue
                    if blob_get:
                        head += data
                        end = head.find(b"\r\n\r\n")
                        if end < 0:
                            continue
                        blob_get, data = False, head[end + 4 :]
                        status = head.split(b" ", 2)[1]
                        if status in (b"200", b"206") and (nbytes := self._take()) is not None:
                            # a cut past the body's end comes at its end
                            size = _CONTENT_LENGTH.search(head[:end])
                            left = min(nbytes, int(size[1])) if size else nbytes
                        client.sendall(head[: end + 4])
                        head = b""
                    if left is not None and len(data) >= left:
                        client.sendall(data[:left])
                        self._on_cut()
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    if left is not None:
                        left -= len(data)
                    client.sendall(data)


# --- the registry ------------------------------------------------------------------------


class Registry:
    """One registry: its config, storage and logs in a folder of its own. ``host`` and ``url``
    are what clients use (the proxy's port when there is one); ``requests()`` is what the
    registry served, from its own log, which is kept across restarts."""

    def __init__(
        self,
        root: Path,
        *,
        tls: bool = False,
        auth: Literal[None, "basic", "token"] = None,
        proxy: bool = False,
    ) -> None:
        if proxy and tls:
            raise ValueError("the cutting proxy reads the HTTP it relays, so it cannot do TLS")
        self._binary = _binary()
        self.root = root
        self.storage = root / "storage"
        self.storage.mkdir()
        self.config = root / "config.yml"
        self.log = root / "registry.log"
        """Distribution's JSON log (its stderr), one line a request among others."""
        self.access_log = root / "access.log"
        """Its Combined Log Format access log (its stdout): also the requests refused by auth."""
        self._port = free_port()
        self._scheme = "https" if tls else "http"
        self.ca_file: Path | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.token_server: TokenServer | None = None
        self._proxy: _CutProxy | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()

        settings: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            # a fixed secret, so that an upload begun before a restart can go on after it
            "http": {"addr": f"127.0.0.1:{self._port}", "secret": secrets.token_hex(16)},
        }
        if tls:
            self._make_tls(settings["http"])
        if auth is not None:
            self.username, self.password = "goldclone", secrets.token_urlsafe(12)
        if auth == "basic":
            htpasswd = root / "htpasswd"
            htpasswd.write_text(f"{self.username}:{_bcrypt(self.password or '')}\n")
            settings["auth"] = {"htpasswd": {"realm": SERVICE, "path": str(htpasswd)}}
        elif auth == "token":
            self.token_server = TokenServer(self.username or "", self.password or "")
            bundle = root / "token-signer.pem"
            bundle.write_bytes(_pem(self.token_server.certificate))
            token = {"realm": self.token_server.url, "service": SERVICE, "issuer": ISSUER,
                     "rootcertbundle": str(bundle)}  # fmt: skip
            settings["auth"] = {"token": token}
        if proxy:
            self._proxy = _CutProxy(self._port, self._die)
        # JSON is YAML: no YAML writer needed
        self.config.write_text(json.dumps(settings, indent=2) + "\n")
        port = self._proxy.port if self._proxy else self._port
        self.host = f"127.0.0.1:{port}"
        self.url = f"{self._scheme}://{self.host}"

    def _make_tls(self, http: dict[str, Any]) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("goldclone test CA", ca_key, None, ca=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("127.0.0.1", key, (ca, ca_key), ca=False, server=True)
        self.ca_file = self.root / "ca.pem"
        self.ca_file.write_bytes(_pem(ca))
        (self.root / "server.pem").write_bytes(_pem(cert) + _pem(ca))
        (self.root / "server-key.pem").write_bytes(_key_pem(key))
        os.chmod(self.root / "server-key.pem", 0o600)
        http["tls"] = {"certificate": str(self.root / "server.pem"),
                       "key": str(self.root / "server-key.pem")}  # fmt: skip

    @property
    def tokens_issued(self) -> int:
        return self.token_server.tokens_issued if self.token_server else 0

    @property
    def pid(self) -> int | None:
        """The running registry's PID, or None when it is not running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def ssl_context(self) -> ssl.SSLContext:
        """What httpx's ``verify`` wants for this registry: a context that trusts the test CA
        (the system's CAs without TLS), made once, as loading CAs takes a while."""
        if self._ssl is None:
            cafile = str(self.ca_file) if self.ca_file else None
            self._ssl = ssl.create_default_context(cafile=cafile)
        return self._ssl

    def start(self) -> None:
        """Start the registry (stopping it first if it runs) on the same port, config and
        storage, and return once ``GET /v2/`` answers (200, or 401 with auth)."""
        self.stop()
        # REGISTRY_* variables would override the config file
        env = {
            name: value for name, value in os.environ.items() if not name.startswith("REGISTRY_")
        }
        with self.access_log.open("ab") as stdout, self.log.open("ab") as stderr:
            process = subprocess.Popen([str(self._binary), "serve", str(self.config)],
                                       stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                       env=env)  # fmt: skip
        with self._lock:
            self._process = process
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._probe(_PROBE_AGENT):
            if process.poll() is not None:
                pytest.fail(f"the registry exited with {process.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the registry did not answer GET /v2/ in {_START_TIMEOUT} s:\n"
                            f"{self._tail()}")  # fmt: skip
            time.sleep(0.02)  # between polls of the port: no event tells when it listens

    def _probe(self, agent: str) -> bool:
        """Whether ``GET /v2/`` straight to the registry (not through the proxy) answers, as
        it does once it serves: 200, or 401 with auth."""
        try:
            answer = httpx.get(
                f"{self._scheme}://127.0.0.1:{self._port}/v2/",
                headers={"User-Agent": agent},
                verify=self.ssl_context(),
                timeout=2,
            )
        except httpx.TransportError:
            return False
        return answer.status_code in (200, 401)

    def stop(self) -> None:
        """End the registry by its PID: SIGTERM, then SIGKILL if it is still there after a few
        seconds; wait for it either way."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def _die(self) -> None:
        """The registry dies at once (SIGKILL to its PID), as in a crash; called by the proxy."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def cut_blob_after(self, nbytes: int) -> None:
        """Make the next blob GET that the registry answers 200 or 206 end after ``nbytes`` of
        its body (or at the body's end, if shorter), the registry killed (SIGKILL by its PID)
        at that moment and the client's connection closed. ``start()`` brings it back. Needs
        ``proxy=True`` (so no TLS). The registry may or may not have logged the cut GET, with
        all its bytes as ``written``: it may have written the rest into the kernel's socket
        buffers (up to 4 MiB on loopback) before it died."""
        if self._proxy is None:
            raise RuntimeError("cut_blob_after needs running_registry(..., proxy=True)")
        self._proxy.arm(nbytes)

    def requests(self) -> list[Served]:
        """Every request the registry answered so far, in order, from its access log (its
        stdout, in Combined Log Format, whatever ``log.formatter`` says; its JSON log leaves
        out the requests refused by auth). Its readiness probes are left out.

        The registry logs a request after its last byte is on the socket, so a client may be
        done before its line is written: while the registry runs, this first sends one probe
        more on a connection of its own and waits for that probe's line."""
        if self.pid is not None:
            self._catch_up()
        served = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            entry = _ACCESS_LINE.match(line)
            if entry is None or entry["agent"].startswith(_PROBE_AGENT):
                continue
            path, _, query = entry["uri"].partition("?")
            size = entry["size"]
            served.append(Served(method=entry["method"], path=path, status=int(entry["status"]),
                                 written=0 if size == "-" else int(size), query=query))  # fmt: skip
        return served

    def _catch_up(self) -> None:
        marker = f"{_PROBE_AGENT} {secrets.token_hex(8)}"
        if not self._probe(marker):
            return  # it has just died: its log has what it will ever have
        deadline = time.monotonic() + _START_TIMEOUT
        while f'"{marker}"' not in self.access_log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                pytest.fail(f"the registry answered a probe but did not log it:\n{self._tail()}")
            time.sleep(0.005)  # between reads of the log: no event tells when it writes

    def blob_gets(self) -> list[Served]:
        """The GETs of ``/v2/<repo>/blobs/sha256:<hex>`` that the registry answered with
        bytes (200, or 206 for a range)."""
        return [
            one
            for one in self.requests()
            if one.method == "GET" and one.status in (200, 206) and _BLOB_PATH.fullmatch(one.path)
        ]

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_registry(
    folder: Path,
    *,
    tls: bool = False,
    auth: Literal[None, "basic", "token"] = None,
    proxy: bool = False,
) -> Iterator[Registry]:
    """A registry running in a new folder under ``folder`` (so its command line names
    ``folder``), with its token server or proxy if asked; stopped by its PID, and the threads
    ended, whatever happens. The folder stays, for a look after a failure."""
    # absolute, not resolved: the command line must hold ``folder`` as the caller spells it
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=folder.absolute()))
    registry = Registry(root, tls=tls, auth=auth, proxy=proxy)
    try:
        if registry.token_server:
            registry.token_server.start()
        if registry._proxy:
            registry._proxy.start()
        registry.start()
        yield registry
    finally:
        try:
            registry.stop()
        finally:
            if registry._proxy:
                registry._proxy.close()
            if registry.token_server:
                registry.token_server.close()


# --- a client ----------------------------------------------------------------------------


class _TokenAuth(httpx.Auth):
    """The Docker token dance for httpx: on a 401 with a Bearer challenge, get a token for
    its scope from its realm with HTTP Basic credentials, and send the request again. When
    the token server refuses, the answer is the token server's (its 401 or 400)."""

    def __init__(self, username: str, password: str) -> None:
        self._basic = httpx.BasicAuth(username, password)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        challenge = response.headers.get("WWW-Authenticate", "")
        if response.status_code != 401 or not challenge.startswith("Bearer "):
            return
        asked = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        params = {name: asked[name] for name in ("service", "scope") if name in asked}
        token_request = httpx.Request("GET", asked["realm"], params=params)
        token_response = yield next(self._basic.auth_flow(token_request))
        if token_response.status_code != 200:
            return
        token_response.read()
        request.headers["Authorization"] = f"Bearer {token_response.json()['token']}"
        yield request


def client(registry: Registry, *, credentials: bool = True, timeout: float = 30) -> httpx.Client:
    """An httpx client for ``registry.url`` that trusts its CA and, with ``credentials``,
    logs in as its user the way its auth wants (Basic, or tokens from its token server)."""
    auth: httpx.Auth | None = None
    if credentials and registry.username is not None and registry.password is not None:
        auth = (
            _TokenAuth(registry.username, registry.password)
            if registry.token_server
            else httpx.BasicAuth(registry.username, registry.password)
        )
    return httpx.Client(base_url=registry.url, verify=registry.ssl_context(), auth=auth,
                        timeout=timeout)  # fmt: skip


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``, as a registry names blobs."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def push_blob(http: httpx.Client, repo: str, data: bytes) -> str:
    """Push ``data`` as a blob of ``repo`` in one monolithic upload (POST, then PUT with the
    digest), and return its digest."""
    digest = sha256_digest(data)
    started = http.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    # the Location holds the upload's signed _state: add to its query, do not replace it
    put = http.put(f"{location}{'&' if '?' in location else '?'}digest={digest}", content=data,
                   headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == digest
    return digest


@dataclass(frozen=True)
class Pushed:
    """An image that ``push_image`` pushed: its manifest as stored, and every blob's bytes."""

    repo: str
    tag: str
    manifest: bytes
    digest: str
    blobs: dict[str, bytes]
    layers: tuple[str, ...]


def push_image(
    http: httpx.Client,
    repo: str,
    tag: str,
    layers: list[bytes],
    *,
    layer_type: str = OCI_LAYER,
    config: bytes = b"{}",
    config_type: str = OCI_CONFIG,
    annotations: dict[str, str] | None = None,
) -> Pushed:
    """Push an OCI image manifest with these layers (all of ``layer_type``) and config, tagged
    ``tag``."""
    blobs = {push_blob(http, repo, config): config}
    layer_digests = tuple(push_blob(http, repo, layer) for layer in layers)
    blobs.update(zip(layer_digests, layers, strict=True))
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": sha256_digest(config), "size": len(config)},
        "layers": [
            {"mediaType": layer_type, "digest": digest, "size": len(layer)}
            for digest, layer in zip(layer_digests, layers, strict=True)
        ],
    }
    if annotations:
        document["annotations"] = annotations
    manifest = json.dumps(document, indent=2).encode()
    put = http.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                   headers={"Content-Type": OCI_MANIFEST})  # fmt: skip
    assert put.status_code == 201, put.text
    digest = sha256_digest(manifest)
    assert put.headers["Docker-Content-Digest"] == digest
    return Pushed(repo=repo, tag=tag, manifest=manifest, digest=digest, blobs=blobs,
                  layers=layer_digests)  # fmt: skip


def push_artifact(registry: Registry, repo: str, tag: str, disk: Path, chunk: int) -> str:
    """goldclone's disk artifact of the raw ``disk``, cut by the service's own code and pushed
    blob by blob; the manifest's digest."""
    with client(registry, timeout=600) as http:
        layers = []
        for part in cut(disk, "raw", chunk):
            if isinstance(part, tuple):
                packed, found = part
                push_blob(http, repo, packed)
                layers.append(found.layer)
            else:
                config = part
        push_blob(http, repo, config.to_json())
        body = manifest_json(config_descriptor(config), layers)
        put = http.put(
            f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}
        )
        assert put.status_code == 201, put.text
        return sha256_digest(body)
