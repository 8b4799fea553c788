from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmmesh.common.streams import coalesce


async def test_a_lagging_consumer_gets_merged_lists_in_order() -> None:
    """Items produced while the consumer is busy arrive together, in order, none lost."""
    produced = asyncio.Event()

    async def source() -> AsyncIterator[list[int]]:
        for i in range(6):
            yield [i]
        produced.set()

    out = []
    async for batch in coalesce(source()):
        out.append(batch)
        await produced.wait()  # a slow consumer: everything is produced during the first item
    assert [x for b in out for x in b] == list(range(6))
    assert len(out) < 6


async def test_a_consumer_that_keeps_up_gets_each_list_alone() -> None:
    """Nothing waits for more: when the producer is slower, each list is passed on by itself."""

    async def source() -> AsyncIterator[list[int]]:
        for i in range(3):
            await asyncio.sleep(0.01)
            yield [i]

    assert [b async for b in coalesce(source())] == [[0], [1], [2]]


async def test_source_errors_reach_the_consumer_after_the_items_before_them() -> None:
    """An error raised by the source is re-raised to the consumer after what came before it."""

    async def source() -> AsyncIterator[list[int]]:
        yield [1]
        raise RuntimeError("boom")

    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        async for batch in coalesce(source()):
            seen.extend(batch)
    assert seen == [1]


async def test_closing_the_consumer_runs_the_sources_cleanup() -> None:
    """Leaving the loop early cancels the source, whose finally block runs (this is how Triton is cancelled)."""
    cleaned = asyncio.Event()

    async def source() -> AsyncIterator[list[int]]:
        try:
            for i in range(1000):
                await asyncio.sleep(0.001)
                yield [i]
        finally:
            cleaned.set()

    stream = coalesce(source())
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(cleaned.wait(), 1)
