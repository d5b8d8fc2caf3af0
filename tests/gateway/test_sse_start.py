"""A streamed response's events start before the response does, and stop with it however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tokenfactory.gateway.serving import _sse


async def engine_events(log: list[str], first_token: asyncio.Event):
    """Stands where the gateway's event stream stands: it submits, then waits for the engine."""
    log.append("submitted")
    try:
        await first_token.wait()
        yield "data: 1\n\n"
        yield "data: 2\n\n"
    finally:
        log.append("closed")


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)


def test_the_request_is_submitted_before_the_response_is_sent():
    async def main():
        log, first_token = [], asyncio.Event()
        response = await _sse(engine_events(log, first_token))
        assert log == ["submitted"]  # nothing has iterated the response yet
        first_token.set()
        assert [event async for event in response.body_iterator] == ["data: 1\n\n", "data: 2\n\n", "data: [DONE]\n\n"]
        assert log == ["submitted", "closed"]

    asyncio.run(main())


def test_a_client_leaving_before_the_first_token_closes_the_events():
    async def main():
        log, first_token = [], asyncio.Event()
        response = await _sse(engine_events(log, first_token))
        reader = asyncio.ensure_future(anext(response.body_iterator))
        await asyncio.sleep(0.01)  # the response waits for the first event
        reader.cancel()  # as Starlette cancels a stream whose client disconnected
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await until(lambda: "closed" in log)  # the engine side unwinds (in its own task)

    asyncio.run(main())


def test_a_client_leaving_after_the_first_token_closes_the_events():
    async def main():
        log, first_token = [], asyncio.Event()
        first_token.set()
        response = await _sse(engine_events(log, first_token))
        assert await anext(response.body_iterator) == "data: 1\n\n"
        await response.body_iterator.aclose()
        await until(lambda: "closed" in log)

    asyncio.run(main())
