"""What PostgreSQL needs for change capture, as SQL to run once, in order (``pgsnow postgres-sql``).

Each step is a ``PostgresSetupStep`` (a title, why it is there, its statements as
``psycopg2.sql`` compositions). Every identifier is an ``sql.Identifier`` and every value an
``sql.Literal``; ``render_postgres_setup`` turns them into text through the server's own quoting
when a connection is given, and through the same rules otherwise (``render_composable``), so
the script can be printed from the configuration alone.

The order matters and differs from the order one might guess:

1. the server setting (``wal_level = logical``; on Aurora/RDS a cluster parameter and a reboot);
2. replica identity, *before* the publication: once a table is in a publication that publishes
   updates and deletes, PostgreSQL refuses UPDATE and DELETE on it while it has no replica
   identity (no primary key and not FULL), so the application would fail in between;
3. the heartbeat table when ``CDC_HEARTBEAT=table`` (it must exist to be in the publication);
4. the publication (``publish_via_partition_root``: a partitioned table's changes arrive under
   its own name, as its snapshot does);
5. the slot (``pgoutput``), which starts keeping WAL from the moment it is created;
6. the least-privilege replication user and its grants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql

from pgsnow.config import ExtractMode, HeartbeatMethod, Settings
from pgsnow.errors import ConfigError, PermanentError
from pgsnow.identifiers import TableRef

DEFAULT_USER = "pgsnow_replication"
HEARTBEAT_MESSAGE_FUNCTION = "pg_logical_emit_message(boolean,text,text)"


@dataclass(frozen=True)
class TableIdentity:
    """What the catalog says about a table's replica identity (``pgsnow postgres-sql --dsn``)."""

    table: TableRef
    exists: bool
    has_primary_key: bool = False
    replica_identity: str = "d"  # pg_class.relreplident: d default, f full, i index, n nothing
    partitions_without_key: tuple[TableRef, ...] = ()  # leaves of a partitioned table needing FULL


@dataclass(frozen=True)
class PostgresSetupOptions:
    publication: str
    slot: str
    tables: Sequence[TableRef]
    database: str | None = None  # None: the script says "<database>" where it is needed
    user: str = DEFAULT_USER
    heartbeat: HeartbeatMethod = HeartbeatMethod.MESSAGE
    heartbeat_table: TableRef = field(default_factory=lambda: TableRef("public", "pgsnow_heartbeat"))
    # None: no catalog was read (no DSN); the advice is then given for every table.
    identities: Mapping[TableRef, TableIdentity] | None = None
    message_function_public: bool | None = None  # EXECUTE on pg_logical_emit_message is PUBLIC's
    aurora: bool = True  # print the Aurora/RDS parameter group step


@dataclass(frozen=True)
class PostgresSetupStep:
    title: str
    note: str
    statements: tuple[sql.Composable, ...] = field(default_factory=tuple)
    comments: tuple[str, ...] = ()  # printed as "-- " lines after the note (advice, not SQL)


def build_postgres_setup(options: PostgresSetupOptions) -> list[PostgresSetupStep]:
    """Every step, in the order to run them."""
    _check(options)
    published = _published_tables(options)
    steps = [_server_step(options), _replica_identity_step(options)]
    if options.heartbeat is HeartbeatMethod.TABLE:
        steps.append(_heartbeat_table_step(options))
    steps.append(
        PostgresSetupStep(
            "Publication (as the tables' owner)",
            "The tables whose changes the slot decodes. publish_via_partition_root: changes to a "
            "partition arrive under its partitioned table's name, like its snapshot. To add a table "
            "later, ALTER PUBLICATION ... ADD TABLE (below) before setting its mode to cdc: its "
            "snapshot is taken after it is in the publication (docs/change-capture.md).",
            (
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                    sql.Identifier(options.publication),
                    sql.SQL(", ").join(_table_identifier(t) for t in published),
                ),
            ),
            (
                "adding a table later:",
                "  "
                + render_composable(
                    sql.SQL("ALTER PUBLICATION {} ADD TABLE {};").format(
                        sql.Identifier(options.publication), sql.Identifier("<schema>", "<table>")
                    )
                ),
            ),
        )
    )
    steps.append(
        PostgresSetupStep(
            "Replication slot",
            "The slot keeps every change from now on until pgsnow confirms it (only after the change "
            "files and their manifest are in S3). Creating it waits for the transactions running at that "
            "moment to end. Watch its retained WAL (pgsnow status, the "
            "RetainedWalBytes alarm); drop it (pg_drop_replication_slot) if change capture is retired, "
            "or it pins WAL forever.",
            (
                sql.SQL("SELECT pg_create_logical_replication_slot({}, {})").format(
                    sql.Literal(options.slot), sql.Literal("pgoutput")
                ),
            ),
        )
    )
    steps.append(_user_step(options, published))
    return steps


def render_postgres_setup(steps: Sequence[PostgresSetupStep], conn: Any | None = None) -> str:
    """A psql script: each step numbered, its note and advice as comments, statements ending in ``;``."""
    lines = [
        "-- pgsnow PostgreSQL setup for change capture: run each step in order, in psql, as a superuser",
        "-- (or rds_superuser) connected to the source database (docs/change-capture.md).",
    ]
    for number, step in enumerate(steps, start=1):
        lines += ["", f"-- {number}. {step.title}", *_wrap_comment(step.note)]
        lines += [f"-- {line}" if line else "--" for line in step.comments]
        lines += [f"{render_composable(statement, conn)};" for statement in step.statements]
    return "\n".join(lines) + "\n"


def setup_statements(steps: Sequence[PostgresSetupStep], conn: Any | None = None) -> list[str]:
    """The statements alone, rendered, one string each (to run them one by one)."""
    return [render_composable(statement, conn) for step in steps for statement in step.statements]


def render_composable(composable: sql.Composable, conn: Any | None = None) -> str:
    """``composable`` as SQL text: the server's quoting with a connection; without one, the same
    rules (identifiers always double-quoted with ``"`` doubled; strings single-quoted with ``'``
    doubled, and as ``E''`` strings with ``\\`` doubled when they hold a backslash)."""
    if conn is not None:
        return composable.as_string(conn)
    if isinstance(composable, sql.Composed):
        return "".join(render_composable(part) for part in composable.seq)
    if isinstance(composable, sql.SQL):
        return composable.string
    if isinstance(composable, sql.Identifier):
        return ".".join('"' + part.replace('"', '""') + '"' for part in composable.strings)
    if isinstance(composable, sql.Literal):
        return _literal(composable.wrapped)
    raise PermanentError(f"cannot render {composable!r} without a connection")


def read_table_identities(conn: Any, tables: Iterable[TableRef]) -> dict[TableRef, TableIdentity]:
    """Each table's primary key and replica identity from the catalog, and, for a partitioned
    table, its leaf partitions that have neither (the replica identity that counts is the leaf's)."""
    found: dict[TableRef, TableIdentity] = {}
    with conn.cursor() as cur:
        for table in tables:
            cur.execute(
                """
                SELECT c.oid, c.relkind, c.relreplident,
                       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = %s AND c.relname = %s
                """,
                (table.schema, table.table),
            )
            row = cur.fetchone()
            if row is None:
                found[table] = TableIdentity(table, exists=False)
                continue
            oid, relkind, replident, has_key = row
            leaves: tuple[TableRef, ...] = ()
            if relkind == "p":
                cur.execute(
                    """
                    SELECT n.nspname, c.relname
                      FROM pg_catalog.pg_partition_tree(%s) t
                      JOIN pg_catalog.pg_class c ON c.oid = t.relid
                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     WHERE t.isleaf AND c.relreplident IN ('d', 'n')
                       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                                        WHERE i.indrelid = c.oid AND i.indisprimary)
                     ORDER BY 1, 2
                    """,
                    (oid,),
                )
                leaves = tuple(TableRef(schema, name) for schema, name in cur.fetchall())
            found[table] = TableIdentity(table, True, bool(has_key), str(replident), leaves)
    return found


def read_message_function_public(conn: Any) -> bool:
    """Whether PUBLIC may call ``pg_logical_emit_message`` (the default; a hardened server may revoke it)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT has_function_privilege('public', %s::regprocedure, 'EXECUTE')",
            (HEARTBEAT_MESSAGE_FUNCTION,),
        )
        row = cur.fetchone()
    return bool(row and row[0])


# ----------------------------------------------------------------------------- steps


def _check(options: PostgresSetupOptions) -> None:
    problems = [
        f"{name} must not be empty"
        for name, value in (
            ("publication", options.publication),
            ("slot", options.slot),
            ("user", options.user),
        )
        if not value.strip()
    ]
    if not options.tables:
        problems.append(
            'no table has mode "cdc": name them with --tables or in PGSNOW_TABLE_OPTIONS (docs/change-capture.md)'
        )
    if options.identities is not None:
        problems += [
            f"{t.qualified} is not in this database (check PGSNOW_TABLES and PGSNOW_TABLE_OPTIONS)"
            for t, identity in sorted(options.identities.items(), key=lambda item: _order(item[0]))
            if not identity.exists
        ]
    if problems:
        raise ConfigError(problems)


def _published_tables(options: PostgresSetupOptions) -> list[TableRef]:
    tables = sorted(set(options.tables), key=lambda t: (t.schema, t.table))
    if options.heartbeat is HeartbeatMethod.TABLE and options.heartbeat_table not in tables:
        tables.append(options.heartbeat_table)
    return tables


def _server_step(options: PostgresSetupOptions) -> PostgresSetupStep:
    comments = [
        "A self-managed server: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL.",
        "Set max_slot_wal_keep_size (e.g. 50GB) so a slot that stops advancing cannot fill the disk:",
        "the server then invalidates it instead, and pgsnow reports it with the command that",
        "re-snapshots its tables (pgsnow cdc resnapshot). Keep it well above the RetainedWalAlarmBytes alarm.",
    ]
    if options.aurora:
        comments += [
            "",
            "Aurora PostgreSQL / RDS: in the DB cluster parameter group (RDS: the DB parameter group)",
            "  aws rds modify-db-cluster-parameter-group --db-cluster-parameter-group-name <group> \\",
            '    --parameters "ParameterName=rds.logical_replication,ParameterValue=1,ApplyMethod=pending-reboot"',
            "then reboot the writer instance (aws rds reboot-db-instance --db-instance-identifier <writer>).",
            "max_slot_wal_keep_size is a parameter of the same group (in MB). RDS Proxy does not carry",
            "replication connections: the change-capture function connects to the writer endpoint.",
        ]
    return PostgresSetupStep(
        "Logical decoding (a server setting; this check must say logical)",
        "Change capture reads the write-ahead log through a logical replication slot.",
        (sql.SQL("SHOW wal_level"),),
        tuple(comments),
    )


def _replica_identity_step(options: PostgresSetupOptions) -> PostgresSetupStep:
    statements: list[sql.Composable] = []
    comments: list[str] = []
    for table in sorted(set(options.tables), key=lambda t: (t.schema, t.table)):
        identity = None if options.identities is None else options.identities.get(table)
        name = table.qualified
        if identity is None:
            comments.append(
                f"{name}: primary key (default) if it has one; otherwise run "
                + render_composable(_full_identity(table))
                + ";"
            )
            continue
        if identity.replica_identity == "f":
            comments.append(f"{name}: REPLICA IDENTITY FULL (already)")
        elif identity.replica_identity == "i":
            comments.append(f"{name}: replica identity USING INDEX (already; a unique key)")
        elif identity.has_primary_key and identity.replica_identity == "d":
            comments.append(f"{name}: primary key (default)")
        elif identity.has_primary_key:
            comments.append(
                f"{name}: REPLICA IDENTITY NOTHING: deletes and key changes would not name the row; "
                "back to the primary key:"
            )
            statements.append(
                sql.SQL("ALTER TABLE {} REPLICA IDENTITY DEFAULT").format(_table_identifier(table))
            )
        else:
            comments.append(
                f"{name}: no primary key: FULL, so each update and delete carries the old row "
                "(PostgreSQL refuses UPDATE/DELETE on a published table without a replica identity; "
                "more WAL per change)"
            )
            statements.append(_full_identity(table))
        for leaf in identity.partitions_without_key:
            comments.append(f"{name}: partition {leaf.qualified} has no primary key: FULL (per partition)")
            statements.append(_full_identity(leaf))
    return PostgresSetupStep(
        "Replica identity (before the publication)",
        "Deletes and updates name the row by its replica identity: the primary key by default.",
        tuple(statements),
        tuple(comments),
    )


def _heartbeat_table_step(options: PostgresSetupOptions) -> PostgresSetupStep:
    table = _table_identifier(options.heartbeat_table)
    return PostgresSetupStep(
        "Heartbeat table (CDC_HEARTBEAT=table)",
        "Each run updates its slot's row here, a change in the publication whose position ends the "
        "run; for servers without pg_logical_emit_message (before 14) or where it is revoked.",
        (
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (slot text PRIMARY KEY, beat_at timestamptz NOT NULL, run_id text)"
            ).format(table),
        ),
    )


def _user_step(options: PostgresSetupOptions, published: Sequence[TableRef]) -> PostgresSetupStep:
    user = sql.Identifier(options.user)
    database = sql.Identifier(options.database) if options.database else sql.SQL("<database>")
    schemas = sorted({t.schema for t in published})
    statements: list[sql.Composable] = [
        # LOGIN REPLICATION: a replication connection and the slot functions need it; nothing else.
        sql.SQL("CREATE ROLE {} WITH LOGIN REPLICATION").format(user),
        # TEMPORARY: the drain converts change values through a temporary table.
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(database, user),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.SQL(", ").join(sql.Identifier(s) for s in schemas), user
        ),
        # SELECT: the snapshot (the full run) of each table reads it.
        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
            sql.SQL(", ").join(_table_identifier(t) for t in sorted(set(options.tables), key=_order)), user
        ),
    ]
    comments = [
        "Set its password separately (psql: \\password "
        + render_composable(user)
        + ") and store it in the PostgreSQL secret, never in a file.",
    ]
    if options.heartbeat is HeartbeatMethod.TABLE:
        statements.append(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON TABLE {} TO {}").format(
                _table_identifier(options.heartbeat_table), user
            )
        )
    elif options.message_function_public is False:
        comments.append("pg_logical_emit_message is not PUBLIC's on this server: grant it to the user.")
        statements.append(
            sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(HEARTBEAT_MESSAGE_FUNCTION), user)
        )
    else:
        comments.append(
            "The heartbeat (pg_logical_emit_message) is PUBLIC's by default"
            + (" (checked on this server)." if options.message_function_public else ".")
        )
    comments.append("Aurora/RDS: instead of REPLICATION, GRANT rds_replication TO the user.")
    return PostgresSetupStep(
        "Replication user (least privilege)",
        "The user the change-capture function and the extractor connect as for CDC tables.",
        tuple(statements),
        tuple(comments),
    )


def _full_identity(table: TableRef) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(_table_identifier(table))


def _table_identifier(table: TableRef) -> sql.Identifier:
    return sql.Identifier(table.schema, table.table)


def _order(table: TableRef) -> tuple[str, str]:
    return (table.schema, table.table)


def _wrap_comment(text: str, width: int = 100) -> list[str]:
    lines: list[str] = []
    current = "--"
    for word in text.split():
        if len(current) + 1 + len(word) > width and current != "--":
            lines.append(current)
            current = "--"
        current = f"{current} {word}"
    lines.append(current)
    return lines


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise PermanentError("a NUL character cannot be a PostgreSQL string")
        quoted = value.replace("'", "''")
        if "\\" in quoted:
            return "E'" + quoted.replace("\\", "\\\\") + "'"
        return f"'{quoted}'"
    raise PermanentError(f"cannot render a {type(value).__name__} literal without a connection")


def cdc_tables(settings: Settings) -> list[TableRef]:
    """The tables whose options say ``mode: cdc``, in name order."""
    return sorted(
        (t for t, o in settings.table_options_by_name.items() if o.mode is ExtractMode.CDC), key=_order
    )
