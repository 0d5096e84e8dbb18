"""Find a PostgreSQL server for the local stack, or start an embedded one.

Where the server comes from, first match wins:

1. the ``dsn`` argument;
2. ``PGSNOW_PG_DSN``;
3. the libpq variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``...);
4. the built-in default ``host=127.0.0.1 port=5432 user=postgres dbname=postgres``;
5. an embedded server (``pgserver``) with its data under ``.pgsnow/pgdata`` or ``data_dir``.

Only the built-in default falls back to the embedded server. A server someone *configured*
(1-3) that does not answer is a ConfigError: silently replicating from a different, empty
database would be worse than stopping.

The embedded server runs with ``wal_level = logical`` (change capture): a new data directory's
server is given the setting and restarted once on its first start.

The embedded server listens on a Unix socket only (no TCP port), so its DSN is
``host=<socket dir> port=5432 user=postgres dbname=postgres``. PostgreSQL refuses to run as
root; when we are root, pgserver runs it as a system user ``pgserver`` (created with
``useradd`` if missing) and adds group/other read+execute to the data directory's parent
directories so that user can reach it. Without ``useradd`` and without that user we stop with
a ConfigError saying so.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from pgsnow.config import LIBPQ_ENV_KEYWORDS, postgres_env
from pgsnow.errors import ConfigError

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEFAULT_DATA_DIR = Path(".pgsnow") / "pgdata"
CONNECT_TIMEOUT_S = 3
EMBEDDED_SYSTEM_USER = "pgserver"  # the user pgserver runs postgres as when we are root


@dataclass(frozen=True)
class LocalPostgres:
    """A reachable PostgreSQL server; ``embedded`` if this process started it."""

    dsn: str
    embedded: bool
    _server: Any = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Stop the embedded server (its data stays); a server we did not start is left alone."""
        if self._server is not None:
            self._server.cleanup()


def start_local_postgres(
    dsn: str | None = None,
    data_dir: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    default_dsn: str = DEFAULT_DSN,
) -> LocalPostgres:
    """A reachable server by the rules in the module docstring.

    ``environ`` replaces the process environment (tests); ``default_dsn`` replaces the
    built-in default (tests force the embedded fallback with an unreachable one).
    """
    configured, source = _configured_dsn(dsn, postgres_env(environ))
    if configured is not None:
        problem = _connect_problem(configured)
        if problem is not None:
            raise ConfigError(
                [f"PostgreSQL from {source} ({_describe(configured)}) is not reachable: {problem}"]
            )
        return LocalPostgres(dsn=configured, embedded=False)
    if _connect_problem(default_dsn) is None:
        return LocalPostgres(dsn=default_dsn, embedded=False)
    return start_embedded_postgres(data_dir)


def start_embedded_postgres(data_dir: Path | None = None) -> LocalPostgres:
    """Start (or reuse) a pgserver instance with its data in ``data_dir``, and wait until it answers."""
    from pgserver.postgres_server import get_server

    _check_can_run_as_root()
    data_dir = (data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode="stop": stop the server when the last handle in this process goes away,
    # keep the data so the next start is fast.
    server = get_server(data_dir, cleanup_mode="stop")
    info = server.get_postmaster_info()
    dsn = make_dsn(host=str(info.socket_dir), port=info.port or 5432, user="postgres", dbname="postgres")
    problem = _connect_problem(dsn)
    if problem is not None:
        raise ConfigError([f"embedded PostgreSQL in {data_dir} started but does not answer: {problem}"])
    if wal_level(dsn) != "logical":
        _restart_with_logical_decoding(server, data_dir, dsn)
    return LocalPostgres(dsn=dsn, embedded=True, _server=server)


def _restart_with_logical_decoding(server: Any, data_dir: Path, dsn: str, timeout_s: float = 60) -> None:
    """Give an embedded server ``LOGICAL_WAL_SETTINGS`` and restart it (once per data directory:
    ``ALTER SYSTEM`` keeps them in its postgresql.auto.conf).

    pgserver has no way to pass settings before its first start, so it is restarted with its own
    ``pg_ctl``, which reuses the start's options (socket directory, no TCP) from postmaster.opts.
    pgserver stops the server at exit only if the process it recorded still runs, so its record
    is replaced by the restarted postmaster's."""
    from pgserver import _commands
    from pgserver.utils import PostmasterInfo

    # pgserver builds its command wrappers at import time (one per binary), invisible to mypy.
    pg_ctl: Callable[..., str] = vars(_commands)["pg_ctl"]

    connection = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        connection.autocommit = True  # ALTER SYSTEM cannot run in a transaction
        with connection.cursor() as cursor:
            for name, value in LOGICAL_WAL_SETTINGS.items():
                cursor.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
    finally:
        connection.close()
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=data_dir, user=server.system_user, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        info = PostmasterInfo.read_from_pgdata(data_dir)
        if (
            info is not None
            and info.is_running()
            and info.status == "ready"
            and _connect_problem(dsn) is None
        ):
            break
        if time.monotonic() > deadline:
            raise ConfigError([f"embedded PostgreSQL in {data_dir} did not come back after its restart"])
        time.sleep(0.2)
    server._postmaster_info = info
    if wal_level(dsn) != "logical":
        raise ConfigError([f"embedded PostgreSQL in {data_dir} restarted but wal_level is still not logical"])


LOGICAL_WAL_SETTINGS = {"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20"}
_CLUSTER_CONFIG = re.compile(r"^/etc/postgresql/(?P<version>[^/]+)/(?P<cluster>[^/]+)/postgresql\.conf$")


def wal_level(dsn: str) -> str:
    connection = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW wal_level")
            row = cursor.fetchone()
            return str(row[0]) if row else ""
    finally:
        connection.close()


def ensure_logical_decoding(dsn: str, *, restart_timeout_s: float = 60) -> bool:
    """Make the server at ``dsn`` run with ``wal_level = logical`` (change capture needs it).

    A server already at ``logical`` is left alone (False). A Debian cluster (``pg_ctlcluster``) gets
    ``ALTER SYSTEM`` and a restart, and True is returned once it answers again; any other server is
    a ConfigError saying what to set, because restarting a server we do not manage is not ours to do.
    """
    if wal_level(dsn) == "logical":
        return False
    connection = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SHOW config_file")
            row = cursor.fetchone()
            config_file = str(row[0]) if row else ""
            cluster = _CLUSTER_CONFIG.match(config_file)
            if cluster is None or shutil.which("pg_ctlcluster") is None:
                raise ConfigError(
                    [
                        f"PostgreSQL at {_describe(dsn)} runs with wal_level = replica; change capture needs "
                        "wal_level = logical: set it (ALTER SYSTEM SET wal_level = logical) and restart the server"
                    ]
                )
            for name, value in LOGICAL_WAL_SETTINGS.items():
                cursor.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
    finally:
        connection.close()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster["version"], cluster["cluster"], "restart"],
        check=True,
        capture_output=True,
        timeout=restart_timeout_s,
    )
    deadline = time.monotonic() + restart_timeout_s
    while _connect_problem(dsn) is not None:
        if time.monotonic() > deadline:
            raise ConfigError([f"PostgreSQL at {_describe(dsn)} did not come back after its restart"])
        time.sleep(0.5)
    if wal_level(dsn) != "logical":
        raise ConfigError([f"PostgreSQL at {_describe(dsn)} restarted but wal_level is still not logical"])
    return True


def create_database(admin_dsn: str, name: str, *, drop_existing: bool = False) -> str:
    """Create database ``name`` (kept if it exists, unless ``drop_existing``); return its DSN."""
    connection = psycopg2.connect(admin_dsn, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            if drop_existing:
                cursor.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()
    return make_dsn(admin_dsn, dbname=name)


def _configured_dsn(dsn: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    if dsn is not None:
        return dsn, "the dsn argument"
    if "PGSNOW_PG_DSN" in env:
        return env["PGSNOW_PG_DSN"], "PGSNOW_PG_DSN"
    libpq = {keyword: env[name] for name, keyword in LIBPQ_ENV_KEYWORDS.items() if name in env}
    if libpq:
        names = ", ".join(sorted(name for name in LIBPQ_ENV_KEYWORDS if name in env))
        return make_dsn(**libpq), f"the libpq environment ({names})"
    return None, "the built-in default"


def server_answers(dsn: str) -> bool:
    return _connect_problem(dsn) is None


def _connect_problem(dsn: str) -> str | None:
    """None if ``select 1`` works within the timeout, else why not (never the DSN itself)."""
    try:
        connection = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        connection.close()
    return None


def _describe(dsn: str) -> str:
    """Where a DSN points, without its password, for error messages."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "an unparsable DSN"
    shown = {key: parts[key] for key in ("host", "hostaddr", "port", "user", "dbname") if key in parts}
    return " ".join(f"{key}={value}" for key, value in shown.items()) or "libpq defaults"


def _check_can_run_as_root() -> None:
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(EMBEDDED_SYSTEM_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            raise ConfigError(
                [
                    "PostgreSQL refuses to run as root and the embedded server needs a system user "
                    f"{EMBEDDED_SYSTEM_USER!r}: create it, or run as a non-root user"
                ]
            ) from None
