"""Stream helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

__all__ = ["coalesce"]

T = TypeVar("T")
_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def coalesce(source: AsyncIterator[list[T]]) -> AsyncIterator[list[T]]:
    """Re-yields `source`'s lists, merging those that arrived while the consumer was busy.

    It never waits for more items: a consumer that keeps up gets every list as it comes; one that lags
    gets everything produced since it last asked, in one list. Closing this iterator (or cancelling its
    consumer) cancels the reading of `source`, whose own cleanup then runs.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(_Failed(exc))
            return
        queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            batch: list[T] = item  # type: ignore[assignment]
            pending: object = None
            while not queue.empty():
                nxt = queue.get_nowait()
                if nxt is _END or isinstance(nxt, _Failed):
                    pending = nxt
                    break
                batch = batch + nxt  # type: ignore[operator]
            yield batch
            if pending is _END:
                return
            if isinstance(pending, _Failed):
                raise pending.exc
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
