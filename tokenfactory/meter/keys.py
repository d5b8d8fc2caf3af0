"""API keys owned by tenants, stored hashed: `tf-<key id>-<secret>` is shown once, at creation.

The database keeps the key id, a random per-key salt and HMAC-SHA256(salt, secret), never the
secret. A lookup finds the row by key id and compares hashes in constant time. Every lookup reads
the database, so a revocation (from the CLI, in another process) takes effect on the next request;
the first key ever created from another process takes effect within `HAS_KEYS_RECHECK_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenfactory.control.tiers import KeyPolicy
from tokenfactory.meter.db import connect, is_postgres

KEY_PREFIX = "tf"

HAS_KEYS_RECHECK_S = 1.0
"""How long a gateway with no keys stays open after the first key is created by another process
(the CLI); a key created through the gateway's own admin API takes effect at once."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    name: str
    default_tier: str
    allowed_tiers: tuple[str, ...]
    created_at: float
    revoked_at: float | None

    @property
    def policy(self) -> KeyPolicy:
        return KeyPolicy(self.default_tier, frozenset(self.allowed_tiers))


def _hash(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def split_key(plaintext: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    prefix, _, rest = plaintext.partition("-")
    key_id, _, secret = rest.partition("-")
    if prefix != KEY_PREFIX or not key_id or not secret:
        return None
    return key_id, secret


class KeyStore:
    """Create, look up, list and revoke keys in the factory database. Thread-safe."""

    def __init__(self, db: str | Path) -> None:
        self.db = db
        self._conn = connect(db, "keys")
        self._lock = threading.Lock()
        self._has_keys = False
        self._no_keys_until = 0.0  # monotonic time until which a "no keys" answer stands

    def create(
        self, tenant: str, allowed_tiers: Iterable[str], default_tier: str, name: str = ""
    ) -> tuple[KeyRecord, str]:
        """A new key and its plaintext, which is returned here and never again."""
        allowed = tuple(dict.fromkeys(allowed_tiers))
        if not tenant:
            raise ValueError("a key needs a tenant")
        if default_tier not in allowed:
            raise ValueError(f"default tier {default_tier!r} is not among the allowed tiers {list(allowed)}")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(24), secrets.token_hex(16)
        record = KeyRecord(key_id, tenant, name, default_tier, allowed, time.time(), None)
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (key_id, tenant, name, salt, secret_hash, default_tier, allowed_tiers, "
                "created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (key_id, tenant, name, salt, _hash(salt, secret), default_tier, ",".join(allowed), record.created_at),
            )
            self._has_keys = True
        return record, f"{KEY_PREFIX}-{key_id}-{secret}"

    def authenticate(self, plaintext: str) -> KeyRecord | None:
        """The live (not revoked) key this plaintext is, else None."""
        parts = split_key(plaintext)
        if parts is None:
            return None
        key_id, secret = parts
        with self._lock:
            row = self._conn.execute(f"SELECT salt, secret_hash, {_COLUMNS} FROM api_keys "
                                     "WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(_hash(row[0], secret), row[1]):
            return None
        return _record(row[2:])

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return _record(row) if row else None

    def list(self, tenant: str | None = None, include_revoked: bool = True) -> list[KeyRecord]:
        conditions, params = ["revoked_at IS NULL"] if not include_revoked else [], []
        if tenant is not None:
            conditions.append("tenant = ?")
            params.append(tenant)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at", params).fetchall()
        return [_record(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke a live key; False if there is no such live key."""
        with self._lock:
            cur = self._conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                     (time.time(), key_id))
        return cur.rowcount == 1

    def has_keys(self) -> bool:
        """Whether any key was ever created: then the gateway requires one. Keys are never deleted,
        so a yes is kept; a no is asked again after `HAS_KEYS_RECHECK_S` (or at once, after a key is
        created here). An open gateway asks on every request, and a query of a database that was
        idle while an engine computed costs about 0.1 ms of the time to first token."""
        now = time.monotonic()
        if self._has_keys or now < self._no_keys_until:
            return self._has_keys
        with self._lock:
            self._has_keys = self._conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
        self._no_keys_until = now + HAS_KEYS_RECHECK_S
        return self._has_keys

    @property
    def local(self) -> bool:
        """An embedded SQLite file: a lookup by primary key takes about 0.1 ms and never waits on a
        writer (WAL), cheaper than a hop to a thread; a PostgreSQL server is a network round trip."""
        return not is_postgres(self.db)

    def close(self) -> None:
        self._conn.close()


_COLUMNS = "key_id, tenant, name, default_tier, allowed_tiers, created_at, revoked_at"


def _record(row: Sequence) -> KeyRecord:
    key_id, tenant, name, default_tier, allowed, created_at, revoked_at = row
    return KeyRecord(key_id, tenant, name, default_tier, tuple(allowed.split(",")), created_at, revoked_at)
