"""`tokenfactory keys create|list|revoke` and `tokenfactory usage`: the factory database from a shell."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfactory.control.tiers import ConfigError, FactoryConfig, builtin_config, parse_factory_config
from tokenfactory.meter.db import DB_ENV, default_db, describe, is_postgres
from tokenfactory.meter.energy import energy_by_tier
from tokenfactory.meter.keys import KeyStore
from tokenfactory.meter.ledger import GROUPINGS, summarize

SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_db_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="PATH|URL",
                   help=f"factory database: a SQLite file or a postgresql:// URL (default: ${DB_ENV}, else "
                        f"{default_db()})")


def add_factory_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory-config", type=Path, metavar="YAML",
                   help="tiers, prices, SLOs and limits (default: built-in flex, default and priority tiers)")


def load_factory_config(path: Path | None) -> FactoryConfig:
    if path is None:
        return builtin_config()
    try:
        return parse_factory_config(path.read_text(), source=str(path))
    except (OSError, ConfigError) as e:
        raise SystemExit(f"tokenfactory: bad factory config: {e}") from None


def db_path(args: argparse.Namespace) -> str:
    """The database `--db` names: a SQLite file's path or a PostgreSQL URL."""
    return args.db if args.db is not None else default_db()


def add_keys_commands(keys: argparse._SubParsersAction) -> None:
    create = keys.add_parser("create", help="create a key for a tenant; the key is printed once")
    add_db_argument(create)
    add_factory_config_argument(create)
    create.add_argument("--tenant", required=True)
    create.add_argument("--tier", action="append", dest="tiers", metavar="TIER",
                        help="a tier the key may ask for (repeat; default: every tier)")
    create.add_argument("--default-tier", help="the tier of `service_tier: auto` (default: the factory's)")
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(func=create_key)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    add_db_argument(listing)
    listing.add_argument("--tenant")
    listing.set_defaults(func=list_keys)
    revoke = keys.add_parser("revoke", help="revoke a key; the gateway refuses it from the next request")
    add_db_argument(revoke)
    revoke.add_argument("key_id")
    revoke.set_defaults(func=revoke_key)


def create_key(args: argparse.Namespace) -> int:
    factory = load_factory_config(args.factory_config)
    allowed = args.tiers or sorted(factory.tiers)
    unknown = sorted(set(allowed) - set(factory.tiers))
    if unknown:
        raise SystemExit(f"tokenfactory: unknown tiers {unknown}; the factory sells {sorted(factory.tiers)}")
    default = args.default_tier or (factory.default_tier if factory.default_tier in allowed else allowed[0])
    store = KeyStore(db_path(args))
    try:
        record, plaintext = store.create(args.tenant, allowed, default, args.name)
    except ValueError as e:
        raise SystemExit(f"tokenfactory: {e}") from None
    finally:
        store.close()
    print(f"key id {record.key_id} for tenant {record.tenant!r}, tiers {', '.join(record.allowed_tiers)} "
          f"(default {record.default_tier}). The key, shown only this once:")
    print(plaintext)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    store = KeyStore(db_path(args))
    records = store.list(args.tenant)
    store.close()
    table = Table(title=f"API keys in {describe(db_path(args))}")
    for column in ("key id", "tenant", "name", "tiers", "default tier", "created", "status"):
        table.add_column(column, no_wrap=column == "key id")
    for r in records:
        status = "live" if r.revoked_at is None else f"revoked {_when(r.revoked_at)}"
        table.add_row(r.key_id, r.tenant, r.name, ", ".join(r.allowed_tiers), r.default_tier, _when(r.created_at),
                      status)
    Console(width=140).print(table)
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    store = KeyStore(db_path(args))
    revoked = store.revoke(args.key_id)
    store.close()
    if not revoked:
        raise SystemExit(f"tokenfactory: no live key {args.key_id!r}")
    print(f"revoked {args.key_id}")
    return 0


def add_usage_arguments(p: argparse.ArgumentParser) -> None:
    add_db_argument(p)
    p.add_argument("--by", choices=list(GROUPINGS), default="tenant")
    p.add_argument("--since", default=None, metavar="WHEN",
                   help="a duration back from now (30m, 24h, 7d) or a date (2025-01-31[T12:00])")


def parse_since(text: str | None, now: float) -> float:
    """A unix time from `30m` / `24h` / `7d` (back from `now`) or an ISO date (UTC unless it says)."""
    if not text:
        return 0.0
    unit = SINCE_UNITS.get(text[-1])
    if unit is not None and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * unit
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"tokenfactory: --since {text!r} is neither a duration (30m, 24h, 7d) nor a date") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def usage_main(args: argparse.Namespace) -> int:
    path = db_path(args)
    if not is_postgres(path) and not Path(path).exists():
        raise SystemExit(f"tokenfactory: no factory database at {path}")
    since_s = parse_since(args.since, time.time())
    rows = summarize(path, by=args.by, since=since_s)
    since = f" since {args.since}" if args.since else ""
    table = Table(title=f"Usage by {args.by}{since}")
    table.add_column(args.by)
    for column in ("requests", "prompt tokens", "cached tokens", "completion tokens", "cost (USD)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.group, f"{r.requests:,}", f"{r.prompt_tokens:,}", f"{r.cached_tokens:,}",
                      f"{r.completion_tokens:,}", f"{r.cost_usd:.6f}")
    table.add_section()
    table.add_row("total", f"{sum(r.requests for r in rows):,}", f"{sum(r.prompt_tokens for r in rows):,}",
                  f"{sum(r.cached_tokens for r in rows):,}", f"{sum(r.completion_tokens for r in rows):,}",
                  f"{sum(r.cost_usd for r in rows):.6f}", style="bold")
    Console(width=120).print(table)
    print_energy(path, since_s, since)
    return 0


def print_energy(path: str, since_s: float, since: str) -> None:
    """Joules per token and tokens per joule by tier, over requests the power meter measured."""
    tiers = energy_by_tier(path, since=since_s)
    if not tiers:
        return
    table = Table(title=f"Energy by tier{since} (step energy shared by tokens; computed = uncached prompt + "
                        "completion tokens)")
    table.add_column("tier")
    for column in ("metered requests", "computed tokens", "energy (J)", "J / token", "tokens / J"):
        table.add_column(column, justify="right")
    for t in tiers:
        table.add_row(t.tier, f"{t.requests_metered:,}", f"{t.tokens:,}", f"{t.energy_j:,.3f}",
                      _ratio(t.joules_per_token), _ratio(t.tokens_per_joule))
    Console(width=120).print(table)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
