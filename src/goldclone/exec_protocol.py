"""``GET /vms/{id}/exec``, a WebSocket: the request that opens it, the frames on it, and the
result that ends it; shared by the API and its client (docs/api.md, "Exec")."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

STDIN, STDOUT, STDERR, EXIT, RESIZE = range(5)
"""Each binary message's first byte: the channel of the bytes that follow. The client sends
``STDIN`` (empty: end of input) and ``RESIZE`` (JSON ``TerminalSize``); the server sends
``STDOUT``, ``STDERR`` and, last, ``EXIT`` (JSON ``ExecResult``)."""
MAX_INPUT_FRAME = 1 << 20
"""The most a client puts in one message (the server takes up to 16 MiB)."""
MAX_TIMEOUT = 7 * 86400
SCRIPT_MAX_BYTES = 256 * 1024
TIMED_OUT_EXIT = 124
"""The CLI's exit status for a command the server killed at its timeout, as ``timeout(1)``'s."""

_NoNul = Annotated[StrictStr, Field(pattern=r"^[^\x00]*$")]
_EnvName = Annotated[StrictStr, Field(pattern=r"^[^\x00=]+$", max_length=256)]


class TerminalSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class ExecRequest(BaseModel):
    """The first message on the WebSocket (text, JSON): what to run in the guest."""

    model_config = ConfigDict(extra="forbid")

    argv: Annotated[list[_NoNul], Field(min_length=1, max_length=4096)] | None = None
    """The program and its arguments, found on the guest's ``PATH``."""
    script: _NoNul | None = Field(default=None, max_length=SCRIPT_MAX_BYTES)
    """A shell script, run by ``/bin/sh -c``; exactly one of ``argv`` and ``script``."""
    env: dict[_EnvName, _NoNul] = Field(default={}, max_length=1024)
    """Added to the helper's own (``PATH``, ``HOME``, ``LANG``; ``TERM`` with a TTY). Secret:
    never logged."""
    cwd: _NoNul | None = None
    """Where it runs; the user's home when left out."""
    tty: TerminalSize | None = None
    """Run it on a terminal of this size: stdout and stderr are then one stream."""
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT)
    """Seconds after which the command (its whole process group) is killed."""

    @model_validator(mode="after")
    def _one_command(self) -> ExecRequest:
        if (self.argv is None) == (self.script is None):
            raise ValueError("give exactly one of argv and script")
        return self

    def command(self) -> list[str]:
        return self.argv if self.argv is not None else ["/bin/sh", "-c", self.script or ""]


class ExecResult(BaseModel):
    """The last message: the command's exit code (``128 + signal`` when a signal ended it), or
    an ``error`` (``{"code", "message"}``) when it could not run or the session broke."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    error: dict[str, str] | None = None

    @field_validator("error")
    @classmethod
    def _coded(cls, error: dict[str, str] | None) -> dict[str, str] | None:
        if error is not None and set(error) != {"code", "message"}:
            raise ValueError("an error has a code and a message")
        return error
