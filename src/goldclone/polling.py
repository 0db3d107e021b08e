"""The one way goldclone waits for a condition that has no event to wait on: poll it, with a
deadline."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast, overload

T = TypeVar("T")


@overload
async def until(
    check: Callable[[], Awaitable[T | None]], *, interval: float, timeout: float | None = None
) -> T: ...


@overload
async def until(
    check: Callable[[], T | None], *, interval: float, timeout: float | None = None
) -> T: ...


async def until(
    check: Callable[[], T | Awaitable[T | None] | None],
    *,
    interval: float,
    timeout: float | None = None,
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy, and return
    that. ``check`` may be a plain function or a coroutine function.

    Raises ``TimeoutError`` once ``timeout`` seconds have passed (``None``: never).
    """
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return cast(T, result)
            await asyncio.sleep(interval)
