"""Fixtures for the meter tests: the factory database on each backend, SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.meter.postgres_server import find_initdb, postgres_server, with_schema

_schema_ids = itertools.count()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of this test session (skips without the PostgreSQL binaries or psycopg)."""
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg: pip install -e '.[postgres]'")
    initdb = find_initdb()
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin)")
    with postgres_server(initdb) as url:
        yield url


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """An empty factory database on the session's PostgreSQL server: a fresh schema (made in
    milliseconds, where a fresh database takes most of a second)."""
    import psycopg

    schema = f"factory_{next(_schema_ids)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return with_schema(postgres_url, schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty factory database on each backend: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "factory.db")
    return request.getfixturevalue("postgres_db")
