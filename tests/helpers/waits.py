"""Bounded waits for tests that have no event to await (a remote record changing, say)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def until(fn: Callable[[], Awaitable[Any]], bound: float, what: str, every: float = 0.3) -> Any:
    """``await fn()`` every ``every`` seconds until it is truthy; AssertionError after ``bound``."""
    last = None
    with trio.move_on_after(bound):
        while True:
            last = await fn()
            if last:
                return last
            await trio.sleep(every)
    raise AssertionError(f"no {what} within {bound}s; last={last!r}")
