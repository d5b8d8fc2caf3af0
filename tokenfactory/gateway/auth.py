"""Who is calling: `Authorization: Bearer <key>` becomes a `Caller` (tenant, key id, allowed tiers).

Keys come from two places: plain keys given on the command line (`serve --api-key`: tenant
`default`, every tier allowed) and the factory database's hashed keys (`tokenfactory keys create`).
A key is required when either holds any; with neither, the gateway is open and every caller is
the tenant `anonymous`. The database is read on every request (by primary key), so a revoked key
is refused at once: an embedded SQLite file on the event loop itself (about 0.1 ms, less than the
hop to a thread and back, which is on every request's path to its first token), a PostgreSQL
server in a thread, never blocking the loop on the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request

from tokenfactory.control.tiers import FactoryConfig, KeyPolicy
from tokenfactory.gateway.errors import APIError, invalid_api_key
from tokenfactory.meter.keys import KeyStore

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    key_id: str
    policy: KeyPolicy


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class APIKeyAuth:
    """A FastAPI dependency: the caller, or 401."""

    def __init__(self, tiers: FactoryConfig, keys: Iterable[str] = (), store: KeyStore | None = None) -> None:
        self.static_keys = tuple(k for k in keys if k)
        # Each static key's id is fixed: hash it once here, not on every request.
        self._static_ids = {k: "static-" + hashlib.sha256(k.encode()).hexdigest()[:12] for k in self.static_keys}
        self.store = store
        self.open_policy = KeyPolicy(tiers.default_tier, frozenset(tiers.tiers))

    async def __call__(self, request: Request) -> Caller:
        token = bearer_token(request)
        if self.store is None or self.store.local:
            return self.identify(token)
        return await asyncio.to_thread(self.identify, token)

    def identify(self, token: str | None) -> Caller:
        if token is not None:
            # Constant-time comparison against each key: no timing hint about which prefix matched.
            for key, key_id in self._static_ids.items():
                if hmac.compare_digest(token.encode(), key.encode()):
                    return Caller("default", key_id, self.open_policy)
            record = self.store.authenticate(token) if self.store is not None else None
            if record is not None:
                return Caller(record.tenant, record.key_id, record.policy)
        if self.static_keys or (self.store is not None and self.store.has_keys()):
            raise invalid_api_key()
        return Caller(ANONYMOUS, ANONYMOUS, self.open_policy)


class AdminAuth:
    """Guards /admin: the bearer token must be the admin key given at `serve --admin-key`."""

    def __init__(self, admin_key: str | None) -> None:
        self.admin_key = admin_key

    def __call__(self, request: Request) -> None:
        if not self.admin_key:
            raise APIError(404, "The admin API is off: start the server with --admin-key.", code="admin_disabled")
        token = bearer_token(request)
        if token is None or not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise invalid_api_key()
