"""Bearer tokens for the HTTP face: parsing, and a comparison that takes the same time for any input."""

from __future__ import annotations

import hmac

from aiohttp import web


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None when there is no bearer credential."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def token_matches(given: str, expected: bytes) -> bool:
    # compare_digest on bytes: constant time, and no TypeError on non-ASCII input.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)
