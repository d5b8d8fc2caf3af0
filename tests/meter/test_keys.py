"""Key store: keys are shown once, stored hashed, found by their plaintext, revoked at once; on SQLite and
PostgreSQL alike (the `db` fixture)."""

from __future__ import annotations

import time

import pytest

from tokenfactory.meter.db import connect
from tokenfactory.meter.keys import HAS_KEYS_RECHECK_S, KeyStore, split_key


def test_create_authenticate_list_revoke(db):
    store = KeyStore(db)
    record, plaintext = store.create("acme", ["flex", "default"], "default", name="ci")
    assert plaintext.startswith(f"tf-{record.key_id}-")
    assert store.authenticate(plaintext) == record
    assert store.authenticate(plaintext + "x") is None
    assert store.authenticate(f"tf-{record.key_id}-wrong") is None
    assert store.authenticate("sk-something-else") is None
    other, _ = store.create("globex", ["flex"], "flex")
    assert [r.key_id for r in store.list()] == [record.key_id, other.key_id]
    assert [r.key_id for r in store.list(tenant="globex")] == [other.key_id]
    assert store.revoke(record.key_id) and not store.revoke(record.key_id)
    assert store.authenticate(plaintext) is None
    # A second handle (another process: the CLI) sees the revocation at once.
    assert KeyStore(db).get(record.key_id).revoked_at is not None
    assert [r.key_id for r in store.list(include_revoked=False)] == [other.key_id]
    assert store.list(tenant="nobody") == []


def test_stored_keys_are_not_plaintext(tmp_path):
    path = tmp_path / "factory.db"
    store = KeyStore(path)
    _, plaintext = store.create("acme", ["default"], "default")
    store.close()
    _, secret = split_key(plaintext)  # the secret may itself hold a "-"
    for file in tmp_path.iterdir():  # the database, its WAL and shared-memory files
        assert secret.encode() not in file.read_bytes()


def test_stored_rows_hold_no_secret(db):
    store = KeyStore(db)
    _, plaintext = store.create("acme", ["default"], "default")
    _, secret = split_key(plaintext)  # the secret may itself hold a "-"
    conn = connect(db)
    rows = conn.execute("SELECT * FROM api_keys").fetchall()
    conn.close()
    assert rows and not any(secret in str(value) for row in rows for value in row)


def test_default_tier_must_be_allowed(db):
    with pytest.raises(ValueError, match="not among the allowed tiers"):
        KeyStore(db).create("acme", ["flex"], "priority")


def test_has_keys_sees_a_first_key_from_another_process_within_the_recheck(db, monkeypatch):
    gateway, admin = KeyStore(db), KeyStore(db)  # two gateways' handles on one database
    assert not gateway.has_keys() and not admin.has_keys()
    KeyStore(db).create("acme", ["default"], "default")  # the CLI, in another process
    assert not gateway.has_keys()  # the "no" stands until the recheck is due...
    admin.create("globex", ["flex"], "flex")
    assert admin.has_keys()  # ...but a key created through a handle counts there at once
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + HAS_KEYS_RECHECK_S + 1)
    assert gateway.has_keys()  # the recheck finds the CLI's key
