"""The gateway with its factory database on PostgreSQL: admin API, ledger, CLI readers, revocation."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.live_server import LiveServer, gateway_config
from tokenfactory.cli import main
from tokenfactory.meter.ledger import read_entries

ADMIN_KEY = "admin-secret"


def test_keys_ledger_and_usage_on_postgres(tiny_model_dir, postgres_db, capsys):
    server = LiveServer(gateway_config(tiny_model_dir), db_path=postgres_db, admin_key=ADMIN_KEY).start()
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        created = httpx.post(f"{server.url}/admin/keys", json={"tenant": "acme", "tiers": ["default", "flex"]},
                             headers=admin, timeout=30)
        assert created.status_code == 200, created.text
        key, key_id = created.json()["key"], created.json()["id"]
        listed = httpx.get(f"{server.url}/admin/keys", headers=admin, timeout=30).json()["data"]
        assert [k["id"] for k in listed] == [key_id] and "key" not in listed[0]

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, service_tier="flex",
            stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        [row] = read_entries(postgres_db)  # committed before the stream's last chunk
        assert (row.request_id, row.tenant, row.key_id, row.tier, row.outcome) == (
            chunks[0].id, "acme", key_id, "flex", "completed")
        assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)

        assert main(["usage", "--db", postgres_db, "--by", "tier"]) == 0
        assert "flex" in capsys.readouterr().out
        assert main(["keys", "revoke", "--db", postgres_db, key_id]) == 0
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        server.stop()
