"""A throwaway PostgreSQL server for the tests: initdb into a temp folder, listen on a unix socket there.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user (or
`nobody`) through `runuser`, in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenfactory.bench.serve_bench import free_port

SUPERUSER = "tokenfactory"


def find_initdb() -> Path | None:
    """`initdb` on PATH, else the newest under /usr/lib/postgresql/*/bin (Debian keeps it off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve()
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]) if candidates else None


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: None for the current user, unless that is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a `postgres` nor a `nobody` account to run PostgreSQL as")


@contextmanager
def postgres_server(initdb: Path) -> Iterator[str]:
    """Start a server (fsync off: these tests never crash the server) and yield a superuser URL
    for its `postgres` database; stop it and delete its files on exit."""
    bin_dir = initdb.parent
    user = _run_as()
    base = Path(tempfile.mkdtemp(prefix="tf-pg-"))  # short: a unix socket path is at most ~100 bytes
    prefix: list[str] = []
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", user.pw_name, "--"]
    data, port = base / "data", free_port()
    pg_ctl = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        try:
            subprocess.run([*prefix, str(initdb), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "--no-sync",
                            "-E", "UTF8", "--locale", "C"], check=True, capture_output=True)
            options = f"-p {port} -k {base} -c listen_addresses='' -c fsync=off"
            subprocess.run([*pg_ctl, "-l", str(base / "log"), "-o", options, "-w", "-t", "60", "start"],
                           check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            log = (base / "log").read_text() if (base / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr.decode(errors='replace')}{log}") from None
        try:
            yield f"postgresql://{SUPERUSER}@/postgres?host={base}&port={port}"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

def with_schema(url: str, schema: str) -> str:
    """`url` with its connections' tables in `schema` (first on the search path)."""
    return f"{url}&options=-csearch_path%3D{schema}"
