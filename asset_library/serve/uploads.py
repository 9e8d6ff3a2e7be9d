"""Uploads: a cap on request bodies, and a bounded pool that fingerprints uploaded images.

Fingerprinting decodes a whole image, so a burst of uploads could take every thread of the
service; here at most ``workers`` run at once, on their own threads, and a request that waited
``wait_s`` for one gets a 503 instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


class PoolBusy(RuntimeError):
    """Every fingerprinting slot stayed taken for longer than a request may wait."""


class UploadPool:
    """At most ``workers`` uploads fingerprinted at once; the others wait up to ``wait_s``."""

    def __init__(self, workers: int, wait_s: float) -> None:
        self.workers = workers
        self.wait_s = wait_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fingerprint")
        self._slots: asyncio.Semaphore | None = None

    async def run(self, work: Callable[[], T]) -> T:
        if self._slots is None:  # made on the server's event loop, on first use
            self._slots = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except TimeoutError:
            raise PoolBusy(
                f"all {self.workers} fingerprinting slots stayed busy for {self.wait_s:g} s: "
                "try again later"
            ) from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before the app sees it.

    A declared ``Content-Length`` over the limit is refused without reading; otherwise the body
    is read up to the limit (a chunked body can't slip past) and handed on in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"{int(declared):,} bytes")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes:,} bytes")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        limit = self.max_bytes / 2**20
        detail = f"the request body is too large: {size}, the limit is {limit:g} MiB"
        await send_json(send, 413, {"detail": detail}, [(b"connection", b"close")])


async def send_json(
    send: Send, status: int, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON response from ASGI middleware (before the app has answered)."""
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
