"""Every error goldclone raises on purpose.

One root, each subclass with a stable machine ``code`` and an HTTP ``status``::

    GoldcloneError                      500 internal-error
    ├── InvalidRequest                  400 invalid-request
    ├── VMNotFound                      404 vm-not-found
    ├── ImageNotFound                   404 image-not-found
    ├── VMConflict                      409 vm-conflict
    ├── ImageInUse                      409 image-in-use
    ├── CapacityExceeded                409 capacity-exceeded
    ├── IdempotencyConflict             409 idempotency-conflict
    ├── DriverUnavailable               500 driver-unavailable (at start-up: no usable hypervisor)
    ├── CommandError                    500 command-failed (an external program failed)
    │   └── CommandTimeout              500 command-timeout
    └── VMFailure                       a step of creating a VM failed; stored on the VM
        ├── ImageError
        │   ├── DownloadFailed          download-failed
        │   │   └── URLForbidden        url-forbidden (the outbound policy refuses the address)
        │   ├── ChecksumMismatch        checksum-mismatch
        │   ├── ImageUnsafe             image-unsafe
        │   └── ImageUnsupported        image-unsupported
        ├── InsufficientSpace           insufficient-space
        ├── CloneFailed                 clone-failed
        ├── BootFailed                  boot-failed
        ├── NetworkFailed               network-failed
        ├── IPTimeout                   ip-timeout
        └── Interrupted                 interrupted (the service stopped mid-create)

The API layer maps these to ``{"code", "message"}``; nothing else does.
"""

from __future__ import annotations


class GoldcloneError(Exception):
    """The root of every error that goldclone raises on purpose."""

    code = "internal-error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(GoldcloneError):
    code = "invalid-request"
    status = 400


class VMNotFound(GoldcloneError):
    code = "vm-not-found"
    status = 404

    def __init__(self, message: str = "The requested virtual machine ID was not found") -> None:
        super().__init__(message)


class ImageNotFound(GoldcloneError):
    code = "image-not-found"
    status = 404


class VMConflict(GoldcloneError):
    code = "vm-conflict"
    status = 409


class ImageInUse(GoldcloneError):
    code = "image-in-use"
    status = 409


class CapacityExceeded(GoldcloneError):
    """The VM would take the host past one of its configured totals."""

    code = "capacity-exceeded"
    status = 409


class IdempotencyConflict(GoldcloneError):
    """An ``Idempotency-Key`` came again with a different request body."""

    code = "idempotency-conflict"
    status = 409


class DriverUnavailable(GoldcloneError):
    """The configured hypervisor can't be used on this host; the service does not start."""

    code = "driver-unavailable"


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


class ChecksumMismatch(ImageError):
    code = "checksum-mismatch"


class ImageUnsafe(ImageError):
    code = "image-unsafe"


class ImageUnsupported(ImageError):
    code = "image-unsupported"


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


class Interrupted(VMFailure):
    code = "interrupted"
