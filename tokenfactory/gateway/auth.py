"""API keys: `Authorization: Bearer <key>` must name a configured key (when any are configured).

Tenants and tiers hang off the key later; today a key is either valid or not.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import Request

from tokenfactory.gateway.errors import invalid_api_key


class APIKeyAuth:
    """A FastAPI dependency: raises 401 unless the request carries one of the keys."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.keys = tuple(k for k in keys if k)

    def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise invalid_api_key()
        # Constant-time comparison against each key: no timing hint about which prefix matched.
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in self.keys):
            raise invalid_api_key()
