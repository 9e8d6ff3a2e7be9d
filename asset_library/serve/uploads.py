"""Decodes and uploads: one bounded pool for every decode a request makes, and a cap on
request bodies.

A decode costs memory in proportion to the image's pixels (a 13000x13000 PNG of 0.5 MB holds
0.5 GB once decoded), so every decode the service makes (an uploaded query, a search by md5
that needs the stored image's pixels, a thumbnail) runs here: at most ``workers`` at once, on
their own threads, and together within ``pixel_budget`` pixels. A request that waited
``wait_s`` for room gets a 503 instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asset_library.ingest.fingerprint import DEFAULT_MAX_PIXELS

T = TypeVar("T")

#: Pixels decoded at once across the service: one image at the fingerprint's limit, or many
#: smaller ones. About 4 bytes a pixel at the peak of a decode (RGB pixels and their grey copy).
DEFAULT_PIXEL_BUDGET = DEFAULT_MAX_PIXELS


class PoolBusy(RuntimeError):
    """Every decode slot, or the pixel budget, stayed taken for longer than a request may wait."""


def header_pixels(data: bytes) -> int:
    """The pixels an image's header declares (its first frame), read without decoding; 0 when
    it has no header an opener knows (the decode then fails at once)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image: the decode will say why
        return 0
    return width * height


class DecodePool:
    """At most ``workers`` decodes at once, within ``pixel_budget`` pixels together; the
    others wait up to ``wait_s``."""

    def __init__(
        self, workers: int, wait_s: float, pixel_budget: int = DEFAULT_PIXEL_BUDGET
    ) -> None:
        self.workers = workers
        self.wait_s = wait_s
        self.pixel_budget = pixel_budget
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._room: asyncio.Condition | None = None
        self._running = 0
        self._pixels = 0

    async def run(self, work: Callable[[], T], pixels: int) -> T:
        """``work()`` on a decode thread once a slot and ``pixels`` of the budget are free (an
        image over the whole budget waits for all of it: its decode refuses it anyway)."""
        if self._room is None:  # made on the server's event loop, on first use
            self._room = asyncio.Condition()
        share = min(max(pixels, 0), self.pixel_budget)

        def fits() -> bool:
            return self._running < self.workers and self._pixels + share <= self.pixel_budget

        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(fits), self.wait_s)
            except TimeoutError:
                raise PoolBusy(
                    f"all {self.workers} decode slots or {self.pixel_budget:,} pixels stayed "
                    f"busy for {self.wait_s:g} s: try again later"
                ) from None
            self._running += 1
            self._pixels += share
        loop = asyncio.get_running_loop()
        decode = loop.run_in_executor(self._executor, work)
        # Freed when the decode ends, not when the request does: a client that gave up leaves
        # its decode running, and its pixels counted until then.
        decode.add_done_callback(lambda _: loop.create_task(self._release(share)))
        return await asyncio.shield(decode)

    async def _release(self, share: int) -> None:
        assert self._room is not None
        async with self._room:
            self._running -= 1
            self._pixels -= share
            self._room.notify_all()

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
