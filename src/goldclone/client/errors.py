"""The client's errors::

ClientError
├── ServerUnreachable   the server could not be reached
├── APIError            the server answered with an error; carries its ``code``
├── Failed              what was waited for ended badly; carries its ``code``
│   ├── VMFailed        a VM ended in ``error`` (or stopped)
│   └── ImageFailed     an image's download or unpacking failed
└── WaitTimeout         a VM or image was still on its way when the wait ran out
"""

from __future__ import annotations

import json

from goldclone.models import VM, Image


class ClientError(Exception):
    """The root of the client's errors."""


class ServerUnreachable(ClientError):
    pass


class APIError(ClientError):
    """An error answer, with the server's machine ``code`` and human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Failed(ClientError):
    """What was waited for ended badly, with its error's ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class VMFailed(Failed):
    """The VM ended in ``error`` (its ``code`` and ``message`` are the VM's) or stopped."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        if vm.error:
            super().__init__(vm.error.code, vm.error.message)
        else:
            super().__init__(vm.status.value, f"the VM is {vm.status.value}")


class ImageFailed(Failed):
    """The image's download or unpacking failed; ``code`` and ``message`` are its error's."""

    def __init__(self, image: Image) -> None:
        self.image = image
        error = image.error
        super().__init__(error.code if error else "image-failed",
                         error.message if error else "the image failed")  # fmt: skip


class WaitTimeout(ClientError):
    """A VM (``vm``, its last state) or an image was still on its way when the wait ran out."""

    def __init__(self, subject: str, status: str, timeout: float, vm: VM | None = None) -> None:
        super().__init__(f"{subject} is still {status} after {timeout:g} s")
        self.vm = vm


def error_of(status: int, body: bytes) -> APIError:
    try:
        error = json.loads(body)
        return APIError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return APIError(status, "http-error", f"HTTP {status}")
