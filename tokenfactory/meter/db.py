"""The factory's database: API keys and the usage ledger, in a SQLite file or on a PostgreSQL server.

A database is named by a path (SQLite) or a `postgresql://` URL. Both hold the same schema, written
once in SQL that both accept (TEXT, BIGINT, DOUBLE PRECISION, `ON CONFLICT DO NOTHING`); the
callers write their queries once too, with `?` placeholders. `Database` is the small dialect layer
between them: it opens the connection, turns `?` into psycopg's `%s`, and makes transactions and
schema creation look the same.

SQLite runs in WAL mode with `synchronous=FULL`: a commit returns only after the WAL is on disk, so
a usage record whose commit the gateway awaited before sending a response's final chunk survives a
crash or a power cut that follows it (`NORMAL` would only survive a process crash, and could lose
the last commits on power loss). The gateway batches many records into one commit, which pays for
the fsync. WAL lets readers (`tokenfactory usage`, key lookups) run while the gateway writes.
PostgreSQL's default `synchronous_commit=on` gives the same promise.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenfactory.engine.tiny import default_cache_dir

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
DB_ENV = "TOKENFACTORY_DB"

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

# Two gateways (or a gateway and the CLI) starting at once on a fresh PostgreSQL database would
# race in CREATE TABLE IF NOT EXISTS (a unique violation in the catalog); a transaction-scoped
# advisory lock under this arbitrary id serializes them.
_SCHEMA_LOCK_ID = 0x746F6B656E


def default_db() -> str:
    """`$TOKENFACTORY_DB` (a path or a PostgreSQL URL), else `factory.db` under `$TOKENFACTORY_HOME`
    or `~/.cache/tokenfactory`."""
    return os.environ.get(DB_ENV) or str(default_cache_dir() / "factory.db")


def is_postgres(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(POSTGRES_SCHEMES)


def describe(db: str | Path) -> str:
    """The database's name for messages: a URL loses its password (`user:pw@` or `?password=`)."""
    text = str(db)
    if not is_postgres(db):
        return text
    password = urlsplit(text).password
    if password is not None:
        text = text.replace(f":{password}@", ":***@", 1)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", text)


class Database:
    """One connection to the factory database, SQLite or PostgreSQL, with its schema in place.

    Statements run in autocommit mode unless inside `transaction()`. A PostgreSQL connection that
    broke (a server restart, a network cut) fails what was running on it and is opened again for
    the next statement. Not for concurrent use from several threads at once: give each thread its
    own, or hold a lock."""

    def __init__(self, db: str | Path, purpose: str = "") -> None:
        self.postgres = is_postgres(db)
        self._target = db
        # PostgreSQL lists each connection with its application name: an operator sees which is the ledger's.
        self._application = f"tokenfactory {purpose}".strip()
        self._conn: Any = self._open()
        self._in_transaction = False
        with self.transaction():
            if self.postgres:
                self.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_ID,))
            for statement in SCHEMA:
                self.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the cursor answers `fetchone`, `fetchall` and `rowcount` on both."""
        return self._live().execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.postgres:
            with self._live().cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self._conn.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit what runs inside if it returns, roll it back if it raises."""
        conn = self._live()
        self._in_transaction = True
        try:
            if self.postgres:
                with conn.transaction():
                    yield
                return
            conn.execute("BEGIN")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self._in_transaction = False

    def close(self) -> None:
        self._conn.close()

    def _live(self) -> Any:
        if self.postgres and self._conn.broken and not self._in_transaction:
            self._conn = self._open()
        return self._conn

    def _open(self) -> Any:
        if self.postgres:
            return _open_postgres(str(self._target), self._application)
        return _open_sqlite(Path(self._target))

    def _sql(self, sql: str) -> str:
        # psycopg reads `%` as a placeholder's start: a literal one (`LIKE 'a%'`) is doubled. The
        # queries put no `?` inside string literals, so every `?` is a placeholder.
        return sql.replace("%", "%%").replace("?", "%s") if self.postgres else sql


def connect(db: str | Path, purpose: str = "") -> Database:
    """Open the database at a path or a `postgresql://` URL, creating its tables if needed;
    `purpose` names the connection on a PostgreSQL server (`tokenfactory ledger`)."""
    return Database(db, purpose)


def _open_sqlite(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
    # Outside any transaction (SQLite refuses it inside one). Switching a fresh file to WAL takes an
    # exclusive lock without waiting on the busy timeout, so processes opening it together retry.
    for attempt in range(200):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 199:
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _open_postgres(url: str, application_name: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise RuntimeError("a PostgreSQL database needs psycopg: pip install 'tokenfactory[postgres]'") from None
    try:
        return psycopg.connect(url, autocommit=True, application_name=application_name)
    except psycopg.Error as e:
        raise ConnectionError(f"cannot connect to {describe(url)}: {e}") from None
