"""Waiting on engine rows from async handlers: timeouts, client disconnects, SSE streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.errors import ServiceError, Timeout


async def submit(engine: Any, job: Callable[[], Any], on_text: Callable[[str], None] | None = None,
                 inline: bool = False) -> Any:
    """Build the job (decoding its images) and submit it, in one trip through the thread pool:
    both are CPU work that must not hold up the event loop, and every trip between threads costs
    the cores the model runs on. ``inline``: the job is cheap (small images; see
    :func:`~service.api.images.cheap_to_decode`), so build and submit it here, without the trip."""
    if inline:
        return engine.submit(job(), on_text)
    return await run_in_threadpool(lambda: engine.submit(job(), on_text))


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (call once the request body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_row(request: Request, row: Any, timeout_s: float) -> dict:
    """The row's result; cancels the row if the client goes away or the time limit passes.

    One task listens for the disconnect instead of polling ``request.is_disconnected()``, which
    costs a task group per poll on the event loop that shares the cores with the model.
    """
    future = asyncio.wrap_future(row.future)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        row.cancel()
        if gone in done:
            raise ServiceError("client disconnected")
        raise Timeout(f"no answer within {timeout_s:g} s")
    except asyncio.CancelledError:
        row.cancel()
        raise
    finally:
        gone.cancel()


class RowStream:
    """Bridges a row's text deltas (worker thread) to an async iterator (event loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_text(self, delta: str) -> None:  # called from the engine's worker thread
        self.loop.call_soon_threadsafe(self.items.put_nowait, ("text", delta))

    def attach(self, row: Any) -> None:
        def finished(future: Any) -> None:
            exc = future.exception()
            item = ("error", exc) if exc else ("done", future.result())
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)

        row.future.add_done_callback(finished)

    async def events(self, row: Any, timeout_s: float) -> AsyncIterator[tuple[str, Any]]:
        deadline = self.loop.time() + timeout_s
        try:
            while True:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    row.cancel()
                    yield "error", Timeout(f"no answer within {timeout_s:g} s")
                    return
                try:
                    kind, value = await asyncio.wait_for(self.items.get(), timeout=remaining)
                except TimeoutError:
                    continue
                yield kind, value
                if kind != "text":
                    return
        finally:
            # The client went away (generator closed) or we are done: free the row either way.
            row.cancel()


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def error_payload(exc: BaseException) -> dict:
    if isinstance(exc, ServiceError):
        return {"error": {"code": exc.code, "message": exc.message}}
    return {"error": {"code": "internal_error", "message": "internal error; see the server log"}}
