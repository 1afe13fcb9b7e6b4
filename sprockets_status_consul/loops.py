"""Stopping what runs on an event loop from wherever the stop is awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


async def stop_on_owner(
    owner: asyncio.AbstractEventLoop | None,
    stop: Callable[[], Coroutine[Any, Any, None]],
    abandon: Callable[[], None],
) -> None:
    """Await ``stop()`` on ``owner``, the loop what it stops runs on.

    Tasks can only be awaited on their own loop: on the running loop (or
    when nothing ever ran) ``stop()`` runs here; on a loop running in
    another thread it runs there while this waits; on a loop that is closed,
    or open but not running (it may never run again), nothing can be
    awaited and ``abandon()`` ends what can be ended without awaiting.
    """
    if owner is None or owner is asyncio.get_running_loop():
        await stop()
    elif not owner.is_closed() and owner.is_running():
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stop(), owner))
    else:
        abandon()
