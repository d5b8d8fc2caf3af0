"""The factory's database: one SQLite file holding API keys and the usage ledger.

SQLite in WAL mode with `synchronous=FULL`: a commit returns only after the WAL is on disk, so a
usage record whose commit the gateway awaited before sending a response's final chunk survives a
crash or a power cut that follows it (`NORMAL` would only survive a process crash, and could
lose the last commits on power loss). The gateway batches many records into one commit, which
pays for the fsync. WAL lets readers (`tokenfactory usage`, key lookups) run while the gateway writes.

The schema is plain SQL that PostgreSQL accepts unchanged (TEXT, BIGINT, DOUBLE PRECISION,
`ON CONFLICT DO NOTHING`), so a PostgreSQL URL can be added later behind the same tables; only
SQLite is implemented today.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tokenfactory.engine.tiny import default_cache_dir

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        salt TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        default_tier TEXT NOT NULL,
        allowed_tiers TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        request_id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        tier TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        ttft_s DOUBLE PRECISION,
        duration_s DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        energy_j DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS usage_created_at ON usage (created_at)",
)


def default_db_path() -> Path:
    """`$TOKENFACTORY_HOME/factory.db`, else under `~/.cache/tokenfactory`."""
    return default_cache_dir() / "factory.db"


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the database with the factory's schema and durability settings."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in SCHEMA:
        conn.execute(statement)
    return conn
