"""`tokenfactory keys` and `tokenfactory usage` as a user runs them, on SQLite and PostgreSQL (the `db` fixture)."""

from __future__ import annotations

import time

import pytest

from tokenfactory.cli import main
from tokenfactory.meter.keys import KeyStore
from tokenfactory.meter.ledger import Ledger, LedgerEntry


def test_keys_create_list_revoke(db, capsys):
    assert main(["keys", "create", "--db", db, "--tenant", "acme", "--tier", "flex", "--name", "free plan"]) == 0
    plaintext = capsys.readouterr().out.strip().splitlines()[-1]
    record = KeyStore(db).authenticate(plaintext)
    assert record.tenant == "acme" and record.allowed_tiers == ("flex",) and record.default_tier == "flex"
    main(["keys", "list", "--db", db])
    listing = capsys.readouterr().out
    assert record.key_id in listing and "live" in listing and plaintext not in listing
    assert main(["keys", "revoke", "--db", db, record.key_id]) == 0
    assert KeyStore(db).authenticate(plaintext) is None
    with pytest.raises(SystemExit, match="no live key"):
        main(["keys", "revoke", "--db", db, record.key_id])
    with pytest.raises(SystemExit, match="unknown tiers"):
        main(["keys", "create", "--db", db, "--tenant", "acme", "--tier", "gold"])


def test_usage_prints_totals_by_tenant_and_tier(db, capsys):
    ledger = Ledger(db)
    for i, (tenant, tier) in enumerate([("acme", "default"), ("acme", "priority"), ("globex", "flex")]):
        ledger.submit(LedgerEntry(f"r{i}", time.time() - i, tenant, "k", tier, "tiny", 100, 20, 1000, 0.5, 0.1, 1.0,
                                  "completed"))
    ledger.close()
    assert main(["usage", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "acme" in out and "globex" in out
    total = next(line for line in out.splitlines() if "total" in line)
    assert "3" in total and "3,000" in total and "1.500000" in total
    main(["usage", "--db", db, "--by", "tier", "--since", "2000-01-01"])
    assert "priority" in capsys.readouterr().out
    main(["usage", "--db", db, "--since", "1h"])
    assert "globex" in capsys.readouterr().out
    main(["usage", "--db", db, "--since", "2999-01-01"])
    assert "acme" not in capsys.readouterr().out
