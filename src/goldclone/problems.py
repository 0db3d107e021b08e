"""How a refused request is explained: each problem as its field's dotted path and what is
wrong with it. The server and the CLI say the same with it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError


class FieldProblem(ValueError):
    """A rule of a whole object that one of its fields breaks (a checksum too short for its
    type): raised by a model validator, it is reported under that field, ``image.checksum``,
    rather than under the object."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def explain_validation_error(exc: ValidationError) -> str:
    """The API's message for a request that ``exc`` refused: each problem as its field's
    dotted path and what is wrong with it, e.g. ``image.checksum: must be hexadecimal; cpus:
    Input should be a valid integer``. The server and the CLI say the same with it."""
    return explain_errors(exc.errors())


def explain_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """``explain_validation_error`` of pydantic's error details (``ValidationError.errors()``,
    or FastAPI's, whose locations are relative to the body)."""
    parts = []
    for error in errors:
        path = [str(part) for part in error.get("loc", ())]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblem):
            path.append(cause.field)
        parts.append(f"{'.'.join(path) or 'body'}: {_what_is_wrong(error, cause)}")
    return "; ".join(parts)


def _what_is_wrong(error: Mapping[str, Any], cause: object) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "is required"
    if kind == "value_error" and isinstance(cause, ValueError):
        return str(cause)  # pydantic's msg puts "Value error, " before it
    return str(error.get("msg", "is invalid"))


def explain_json_error(exc: json.JSONDecodeError) -> str:
    """Where a JSON document breaks, and how: ``line 4, column 1: Illegal trailing comma
    before end of object``."""
    return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
