"""Calls that a cancellation cannot cut in two. The store's need it: a transaction cut off
inside the database driver can outlive its connection (on SQLite, one kept the write lock,
and every later write failed with "database is locked"), and a DELETE cuts off its VM's
create task wherever that is."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound=type)


def to_the_end(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """``method``, each call of which runs to its end in a task of its own; its caller's
    cancellation is raised once it has ended."""

    @functools.wraps(method)
    async def whole(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():  # a further cancellation waits on too
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: the caller is gone
            raise

    return whole


def every_call_to_the_end(cls: C) -> C:
    """``cls`` with ``to_the_end`` on each of its public coroutine methods."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, to_the_end(member))
    return cls
