"""A streamed response sends nothing before the engine has the request, and its events stop with
it however it ends."""

from __future__ import annotations

import asyncio
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


class Client:
    """The ASGI server's side of one response: what was sent, and a disconnect to trigger."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()  # the request body was read before the response began
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def serve(events) -> tuple[Client, asyncio.Future]:
    """`events` as an SSE response served to a fake client, in a task of its own."""
    client = Client()
    return client, asyncio.ensure_future(_sse(events)({"type": "http"}, client.receive, client.send))


def test_the_request_is_submitted_before_the_headers_go_out():
    async def main():
        log, first_token, client = [], asyncio.Event(), Client()

        async def send(message: dict) -> None:
            log.append(message["type"])
            await client.send(message)

        response = _sse(engine_events(log, first_token))
        assert log == []  # nothing runs before the response is served
        serving = asyncio.ensure_future(response({"type": "http"}, client.receive, send))
        await asyncio.sleep(0.01)
        # The headers are out while the engine computes; the first event is not.
        assert log == ["submitted", "http.response.start"]
        start = client.sent[0]
        assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
        first_token.set()
        await serving
        assert client.sent[1] == {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
        assert client.body() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert client.sent[-1]["more_body"] is False
        assert log.count("closed") == 1

    asyncio.run(main())


def test_a_client_leaving_before_the_first_token_closes_the_events():
    async def main():
        log, first_token = [], asyncio.Event()
        client, serving = serve(engine_events(log, first_token))
        await asyncio.sleep(0.01)  # the response waits for the first event
        client.gone.set()
        await serving  # ends quietly: nobody is there to read an error
        assert [m["type"] for m in client.sent] == ["http.response.start"]
        await until(lambda: "closed" in log)  # the engine side unwinds (in its own task)

    asyncio.run(main())


def test_a_client_leaving_after_the_first_token_closes_the_events():
    async def main():
        log, more = [], asyncio.Event()

        async def events():
            try:
                yield "data: 1\n\n"
                await more.wait()  # the engine is slow with the next token
                yield "data: 2\n\n"
            finally:
                log.append("closed")

        client, serving = serve(events())
        await until(lambda: client.body() == b"data: 1\n\n")
        client.gone.set()
        await serving
        assert log == ["closed"] and client.body() == b"data: 1\n\n"

    asyncio.run(main())


def test_a_cancelled_response_is_not_mistaken_for_a_disconnect():
    async def main():
        log, first_token = [], asyncio.Event()
        _, serving = serve(engine_events(log, first_token))
        await asyncio.sleep(0.01)
        serving.cancel()  # the server shutting down, say: the cancellation goes on up
        await asyncio.wait([serving])
        assert serving.cancelled()
        await until(lambda: "closed" in log)

    asyncio.run(main())
