"""The factory database's dialect layer: one set of queries on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from tokenfactory.bench.serve_bench import free_port
from tokenfactory.meter.db import connect, default_db, describe
from tokenfactory.meter.ledger import Ledger, LedgerEntry, read_entries


def test_a_transaction_commits_or_rolls_back_as_a_whole(db):
    conn = connect(db)
    insert = "INSERT INTO api_keys VALUES (?, 'acme', '', 'salt', 'hash', 'flex', 'flex', ?, NULL)"
    with conn.transaction():
        conn.execute(insert, ("k1", 1.0))
    with pytest.raises(ZeroDivisionError), conn.transaction():
        conn.execute(insert, ("k2", 2.0))
        raise ZeroDivisionError
    conn.executemany(insert, [("k3", 3.0), ("k4", 4.0)])
    other = connect(db)
    assert [r[0] for r in other.execute("SELECT key_id FROM api_keys ORDER BY created_at").fetchall()] == \
        ["k1", "k3", "k4"]
    assert conn.execute("UPDATE api_keys SET revoked_at = ? WHERE created_at > ?", (9.0, 2.0)).rowcount == 2
    conn.close()
    other.close()


def test_gateways_starting_together_on_a_fresh_database_all_get_the_schema(db):
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            connect(db).close()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=open_and_close) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_messages_never_show_a_password():
    assert describe("postgresql://ledger:s3cret@db.example:5432/factory") == \
        "postgresql://ledger:***@db.example:5432/factory"
    assert describe("postgresql://ledger@db.example/factory") == "postgresql://ledger@db.example/factory"
    assert describe("postgresql:///factory?host=/run/pg&password=s3cret&sslmode=require") == \
        "postgresql:///factory?host=/run/pg&password=***&sslmode=require"
    pytest.importorskip("psycopg")
    with pytest.raises(ConnectionError) as failure:
        connect(f"postgresql://ledger:s3cret@127.0.0.1:{free_port()}/factory?connect_timeout=5")
    assert "s3cret" not in str(failure.value) and "***" in str(failure.value)


def test_the_database_comes_from_the_environment_unless_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENFACTORY_HOME", str(tmp_path))
    monkeypatch.delenv("TOKENFACTORY_DB", raising=False)
    assert default_db() == str(tmp_path / "factory.db")
    monkeypatch.setenv("TOKENFACTORY_DB", "postgresql://ledger@db.example/factory")
    assert default_db() == "postgresql://ledger@db.example/factory"


def test_a_broken_postgres_connection_fails_its_batch_and_is_opened_again(postgres_db):
    psycopg = pytest.importorskip("psycopg")
    ledger = Ledger(postgres_db)
    ledger.submit(ledger_entry("before")).result(timeout=10)
    admin = connect(postgres_db)
    killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name LIKE '% ledger'").fetchall()
    admin.close()
    assert killed == [(True,)]  # the ledger writer's connection, as a server restart would cut it
    with pytest.raises(psycopg.OperationalError):  # the client of this one gets a 500, not its final chunk
        ledger.submit(ledger_entry("during")).result(timeout=10)
    ledger.submit(ledger_entry("after")).result(timeout=10)
    ledger.close()
    assert [e.request_id for e in read_entries(postgres_db)] == ["before", "after"]


def ledger_entry(request_id: str) -> LedgerEntry:
    created_at = {"before": 1.0, "during": 2.0, "after": 3.0}[request_id]
    return LedgerEntry(request_id, created_at, "acme", "k1", "default", "tiny", 10, 0, 5, 0.0, 0.1, 0.2, "completed")
