"""Where a command's results and errors go: stdout for results (tables, or JSON with
``--json``), stderr for errors (one line, or one JSON object with ``--json``). Nothing is
wrapped unless it goes to a terminal, so IDs and checksums stay whole in CI logs."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from pydantic import BaseModel
from rich.console import Console, RenderableType

OWN_CODES = frozenset(
    {"usage-error", "server-unreachable", "wait-timeout", "interrupted", "broken-pipe", "failed"}
)
"""The error codes of the CLI itself, as ``--json`` gives them; the others are the server's."""
_UNWRAPPED = 1_000_000
"""The width given to a console that is not a terminal: wide enough that nothing wraps."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 here, which says "a VM ended in error": the CLI's own handler
        # says what happened, and exits 141
        self.quiet = True
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return _Console(stderr=stderr, highlight=False)
    return _Console(stderr=stderr, width=_UNWRAPPED, soft_wrap=True, highlight=False)


class Output:
    """One command's output. ``json`` is whether ``--json`` was given."""

    def __init__(self, command: str, json: bool) -> None:
        self.command, self.json = command, json
        self.console = console()

    def show(self, renderable: RenderableType) -> None:
        """A table or a line for people (not in ``--json`` mode)."""
        if self.json:
            return
        if isinstance(renderable, str):
            self.console.print(renderable, markup=False)
        else:
            self.console.print(renderable)

    def value(self, value: BaseModel | dict[str, object]) -> None:
        """The command's result as JSON (in ``--json`` mode only)."""
        if self.json:
            if isinstance(value, BaseModel):
                print(value.model_dump_json(indent=2), flush=True)
            else:
                print(json.dumps(value, indent=2), flush=True)

    def listing(self, key: str, items: Sequence[BaseModel], table: RenderableType) -> None:
        """A list: ``table`` for people, or ``{key: [item, ...]}`` as JSON."""
        self.show(table)
        self.value({key: [item.model_dump(mode="json") for item in items]})

    def error(self, code: str, message: str, subject: str | None = None) -> None:
        """One error, on stderr: ``goldclone COMMAND: [SUBJECT: ][CODE: ]MESSAGE`` (the code
        of what the server or a VM said; the CLI's own codes go without), or with ``--json``
        a JSON object ``{"code", "message"[, "id"]}`` on one line."""
        if self.json:
            body = {"code": code, "message": message} | ({"id": subject} if subject else {})
            print(json.dumps(body), file=sys.stderr, flush=True)
            return
        about = f"{subject}: " if subject else ""
        said = "" if code in OWN_CODES else f"{code}: "
        print(f"goldclone {self.command}: {about}{said}{message}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line for people on stderr, also in ``--json`` mode (stdout stays JSON)."""
        print(text, file=sys.stderr, flush=True)
