"""The token rule: with a token set, every request carries it or gets a 401.

API clients send ``Authorization: Bearer <token>``. A browser can't add that header to the
gallery's images, so ``/login`` trades the token for an HttpOnly cookie holding it.
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie

from starlette.types import ASGIApp, Receive, Scope, Send

from asset_library.serve.uploads import send_json

COOKIE = "asset_library_token"
#: Reachable without the token: the login form and what it needs.
OPEN_PATHS = ("/login", "/static/")


class TokenRequired:
    """ASGI middleware comparing the presented token in constant time."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        if not hmac.compare_digest(presented_token(dict(scope["headers"])), self.token):
            accepts_html = b"text/html" in dict(scope["headers"]).get(b"accept", b"")
            if accepts_html and scope["method"] == "GET":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 303,
                        "headers": [(b"location", b"/login"), (b"content-length", b"0")],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            detail = "missing or wrong token: send 'Authorization: Bearer <token>'"
            await send_json(send, 401, {"detail": detail}, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def presented_token(headers: dict[bytes, bytes]) -> bytes:
    """The token a request carries: its bearer header, else its login cookie."""
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and value.strip():
        return value.strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed cookie header is no token
        return b""
    found = cookie.get(COOKIE)
    return found.value.encode("latin-1") if found else b""
