"""Every error goldclone raises on purpose.

One root, each subclass with a stable machine ``code`` and an HTTP ``status``::

    GoldcloneError                      500 internal-error
    ├── InvalidJSON                     400 invalid-json
    ├── InvalidRequest                  400 invalid-request
    ├── VMAmbiguous                     400 vm-ambiguous (a name or ID prefix of several VMs)
    ├── CannotRun                       400 cannot-run (an exec's command: not found, ...)
    ├── Unauthorized                    401 unauthorized
    ├── Forbidden                       403 forbidden (the token's role may not do it)
    ├── VMNotFound                      404 vm-not-found
    ├── ImageNotFound                   404 image-not-found
    ├── PoolNotFound                    404 pool-not-found
    ├── TemplateNotFound                404 template-not-found
    ├── GuestPathNotFound               404 path-not-found (no such file or folder in the guest)
    ├── ConsoleUnavailable              404 console-unavailable
    ├── HostNotFound                    404 host-not-found
    ├── RouteNotFound                   404 not-found
    ├── MethodNotAllowed                405 method-not-allowed
    ├── HostUp                          409 host-up (a host that heartbeats is not forgotten)
    ├── HostLost                        409 host-lost (only a lost host can change its VM)
    ├── VMConflict                      409 vm-conflict
    ├── ImageInUse                      409 image-in-use
    ├── TemplateInUse                   409 template-in-use
    ├── ExecUnavailable                 409 exec-unavailable (no helper in the guest answers)
    ├── ExecFailed                      409 exec-failed (the helper went away mid-session)
    ├── ImageNotReady                   409 image-not-ready
    ├── CapacityExceeded                409 capacity-exceeded
    ├── IdempotencyConflict             409 idempotency-conflict
    ├── NameConflict                    409 name-conflict
    ├── BodyTooLarge                    413 body-too-large
    ├── UnsupportedMediaType            415 unsupported-media-type
    ├── RegistryUnavailable             502 registry-unavailable (a tag could not be resolved)
    ├── StoreUnavailable                503 store-unavailable (the database is down or busy)
    ├── StateConflict                   500 state-conflict (a state change the store refused)
    ├── DriverUnavailable               500 driver-unavailable (at start-up: no usable hypervisor)
    ├── DataDirInUse                    500 data-dir-in-use (at start-up: another service has it)
    ├── AddressUnavailable              500 address-unavailable (at start-up: the API's port)
    ├── StartFailed                     500 start-failed (at start-up: the service's parts)
    ├── SchemaTooNew                    500 schema-too-new (at start-up: a newer goldclone's store)
    ├── QMPError                        500 qmp-error (QEMU's monitor failed or refused)
    │   └── QMPRefused                  500 qmp-error (QEMU or its agent answered with an error)
    ├── CommandError                    500 command-failed (an external program failed)
    │   └── CommandTimeout              500 command-timeout
    ├── TemplateFailed                  500 template-failed (a pool's template: its error)
    └── VMFailure                       500 vm-failed: a step of creating a VM failed
        ├── ImageError                  500 image-error
        │   ├── DownloadFailed          500 download-failed
        │   │   ├── URLForbidden        500 url-forbidden (the outbound policy refuses it)
        │   │   └── ManifestUnknown     500 download-failed (a registry has no such tag)
        │   ├── ImageMissing            500 image-missing (named by its ID, not here)
        │   ├── ChecksumMismatch        500 checksum-mismatch
        │   ├── ImageUnsafe             500 image-unsafe
        │   └── ImageUnsupported        500 image-unsupported
        ├── DiskTooSmall                500 disk-too-small (disk_size below its image's)
        ├── InsufficientSpace           500 insufficient-space
        ├── CloneFailed                 500 clone-failed
        ├── BootFailed                  500 boot-failed
        ├── NetworkFailed               500 network-failed
        ├── IPTimeout                   500 ip-timeout
        ├── NotReady                    500 not-ready (the ready_when probe never passed)
        └── Interrupted                 500 interrupted (the service stopped mid-create)

The API layer maps these to ``{"code", "message"}``; nothing else does. An error whose status
is 500 reaches a client only as ``internal-error`` (a 502 says what a registry did); a
``VMFailure`` only inside its VM, with its code. ``tests/fast/test_layout.py`` keeps this tree
the classes' own.
"""

from __future__ import annotations

from collections.abc import Iterator


class GoldcloneError(Exception):
    """The root of every error that goldclone raises on purpose."""

    code = "internal-error"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        vm: str | None = None,
        image: str | None = None,
        host: str | None = None,
        pool: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        about = {"vm": vm, "image": image, "host": host, "pool": pool}
        self.about = {kind: name for kind, name in about.items() if name is not None}
        """What the error is about, by kind: for the logs, never for an answer (a VM of
        another tenant is not found, whatever its ID)."""

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def context(self) -> str:
        """``about`` as a log line's end: `` (vm=..., image=...)``, or nothing."""
        named = ", ".join(f"{kind}={name}" for kind, name in self.about.items())
        return f" ({named})" if named else ""


class InvalidJSON(GoldcloneError):
    code = "invalid-json"
    status = 400


class InvalidRequest(GoldcloneError):
    code = "invalid-request"
    status = 400


class VMAmbiguous(GoldcloneError):
    """A reference to a VM (a name, or the start of an ID) that names several of the caller's
    VMs; the message lists them."""

    code = "vm-ambiguous"
    status = 400


class CannotRun(GoldcloneError):
    """The guest could not start the command: not found (its exit code 127), not executable
    or its working directory missing (126). Reported in an exec's result."""

    code = "cannot-run"
    status = 400


class Unauthorized(GoldcloneError):
    code = "unauthorized"
    status = 401

    def __init__(self, message: str = "a valid bearer token is required") -> None:
        super().__init__(message)


class Forbidden(GoldcloneError):
    code = "forbidden"
    status = 403


class VMNotFound(GoldcloneError):
    code = "vm-not-found"
    status = 404

    def __init__(
        self,
        message: str = "The requested virtual machine ID was not found",
        *,
        vm: str | None = None,
    ) -> None:
        super().__init__(message, vm=vm)


class ImageNotFound(GoldcloneError):
    code = "image-not-found"
    status = 404


class PoolNotFound(GoldcloneError):
    code = "pool-not-found"
    status = 404


class TemplateNotFound(GoldcloneError):
    code = "template-not-found"
    status = 404


class GuestPathNotFound(GoldcloneError):
    code = "path-not-found"
    status = 404


class ConsoleUnavailable(GoldcloneError):
    """The VM's driver keeps no console of it."""

    code = "console-unavailable"
    status = 404


class HostNotFound(GoldcloneError):
    code = "host-not-found"
    status = 404


class HostUp(GoldcloneError):
    """``DELETE /hosts/{id}`` of a host that still heartbeats."""

    code = "host-up"
    status = 409


class HostLost(GoldcloneError):
    """A change of a VM whose host is ``lost``: only that host can make it."""

    code = "host-lost"
    status = 409


class RouteNotFound(GoldcloneError):
    code = "not-found"
    status = 404


class MethodNotAllowed(GoldcloneError):
    code = "method-not-allowed"
    status = 405


class VMConflict(GoldcloneError):
    code = "vm-conflict"
    status = 409


class ImageInUse(GoldcloneError):
    code = "image-in-use"
    status = 409


class TemplateInUse(GoldcloneError):
    """A template that VMs restored from it, or a pool that restores from it, still need."""

    code = "template-in-use"
    status = 409


class ExecUnavailable(GoldcloneError):
    """Commands cannot be run in the VM's guest: why is in the message (no helper answers, a
    template made before the exec port, a driver without a channel)."""

    code = "exec-unavailable"
    status = 409


class ExecFailed(GoldcloneError):
    """The guest's helper went away in the middle of a session (the VM stopped)."""

    code = "exec-failed"
    status = 409


class ImageNotReady(GoldcloneError):
    """The image is known but not on disk yet (being fetched), or its last fetch failed."""

    code = "image-not-ready"
    status = 409


class CapacityExceeded(GoldcloneError):
    """The VM would take the host past one of its configured totals."""

    code = "capacity-exceeded"
    status = 409


class IdempotencyConflict(GoldcloneError):
    """An ``Idempotency-Key`` came again with a different request body."""

    code = "idempotency-conflict"
    status = 409


class NameConflict(GoldcloneError):
    """Another VM that exists has the ``name`` asked for."""

    code = "name-conflict"
    status = 409


class BodyTooLarge(GoldcloneError):
    code = "body-too-large"
    status = 413


class UnsupportedMediaType(GoldcloneError):
    code = "unsupported-media-type"
    status = 415


class RegistryUnavailable(GoldcloneError):
    """A registry could not say what a tag is now (unreachable, or it refused goldclone)."""

    code = "registry-unavailable"
    status = 502


class StoreUnavailable(GoldcloneError):
    """The store's database could not be reached, or gave no connection in time: answered
    with ``Retry-After``, and never a 500."""

    code = "store-unavailable"
    status = 503
    retry_after = 2
    """Seconds a client should wait before it asks again."""


class StateConflict(GoldcloneError):
    """A VM was not in a state from which the change asked for is allowed; another actor
    changed it first."""

    code = "state-conflict"


class DriverUnavailable(GoldcloneError):
    """The configured hypervisor can't be used on this host; the service does not start."""

    code = "driver-unavailable"


class DataDirInUse(GoldcloneError):
    """Another service holds the data dir; this one does not start."""

    code = "data-dir-in-use"


class AddressUnavailable(GoldcloneError):
    """The API's address cannot be listened on (another program has the port); the service
    does not start, and has done nothing."""

    code = "address-unavailable"


class StartFailed(GoldcloneError):
    """A part of the service failed to start; what it said is in the log."""

    code = "start-failed"


class SchemaTooNew(GoldcloneError):
    """The store was made by a newer goldclone; this one does not start, and changes nothing."""

    code = "schema-too-new"


class QMPError(GoldcloneError):
    """QEMU's monitor could not be reached, timed out, or refused a command."""

    code = "qmp-error"


class QMPRefused(QMPError):
    """QEMU or its guest agent answered a command with an error: the channel is fine."""


class CommandError(GoldcloneError):
    """An external program exited non-zero; carries the command and its first stderr line."""

    code = "command-failed"

    def __init__(self, argv: list[str], returncode: int | None, stderr_line: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_line = stderr_line
        super().__init__(f"{argv[0]} exited with {returncode}: {stderr_line}".rstrip(": "))


class CommandTimeout(CommandError):
    code = "command-timeout"

    def __init__(self, argv: list[str], timeout: float) -> None:
        super().__init__(argv, None, "")
        self.message = f"{argv[0]} did not finish within {timeout:g} s"
        self.args = (self.message,)


class VMFailure(GoldcloneError):
    """A step of creating a VM failed. The VM ends in ``error`` holding this code and message."""

    code = "vm-failed"


class ImageError(VMFailure):
    code = "image-error"


class DownloadFailed(ImageError):
    code = "download-failed"


class URLForbidden(DownloadFailed):
    """A URL leads to an address that the outbound policy refuses."""

    code = "url-forbidden"


class ManifestUnknown(DownloadFailed):
    """The registry has no such tag or digest in the repository."""


class ImageMissing(ImageError):
    """An image named by its ID is not on this host, or not one that the tenant may use: it
    has no source to be fetched from."""

    code = "image-missing"


class ChecksumMismatch(ImageError):
    code = "checksum-mismatch"


class ImageUnsafe(ImageError):
    code = "image-unsafe"


class ImageUnsupported(ImageError):
    code = "image-unsupported"


class DiskTooSmall(VMFailure):
    """A ``disk_size`` below the size of its image's disk, found once the image is here."""

    code = "disk-too-small"


class InsufficientSpace(VMFailure):
    """The data dir's disk has no room for an image; nothing of it is kept."""

    code = "insufficient-space"


class CloneFailed(VMFailure):
    code = "clone-failed"


class BootFailed(VMFailure):
    code = "boot-failed"


class NetworkFailed(VMFailure):
    code = "network-failed"


class IPTimeout(VMFailure):
    code = "ip-timeout"


class NotReady(VMFailure):
    code = "not-ready"


class TemplateFailed(GoldcloneError):
    """The memory template that a warm pool restores its machines from could not be made: a
    pool's ``error``, never an answer."""

    code = "template-failed"


class Interrupted(VMFailure):
    code = "interrupted"


def subclasses(root: type[GoldcloneError]) -> Iterator[type[GoldcloneError]]:
    """Every class below ``root``, depth first."""
    for cls in root.__subclasses__():
        yield cls
        yield from subclasses(cls)


def answer_codes() -> dict[int, list[str]]:
    """The codes that API answers can carry, by HTTP status: every error but those of status
    500, and ``internal-error`` for those. The API's OpenAPI description and docs/api.md list
    exactly these."""
    codes: dict[int, list[str]] = {500: [GoldcloneError.code]}
    for cls in subclasses(GoldcloneError):
        if cls.status != 500 and not issubclass(cls, VMFailure):
            codes.setdefault(cls.status, []).append(cls.code)
    return dict(sorted(codes.items()))


def vm_error_codes() -> list[str]:
    """The codes that a VM in ``error`` can hold: each ``VMFailure``, ``host-lost`` (its host
    was forgotten), and ``internal-error``."""
    groups = (ImageError,)  # a family of failures; never raised itself
    found = [cls.code for cls in subclasses(VMFailure) if cls not in groups]
    return [*found, HostLost.code, GoldcloneError.code]
