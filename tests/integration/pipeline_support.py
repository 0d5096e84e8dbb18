"""The local pipeline the proof suites drive (conftest's ``pipeline`` fixtures): ``pipeline_harness``
starts a stack with a source schema of its own, and ``PipelineHarness`` is that running stack
with the checks the suites share. ``RecordingLoader`` is the real loader handler with every
delivery and its verdict written down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from stack_support import (
    MAX_RECEIVE_COUNT,
    VISIBILITY_TIMEOUT_S,
    autocommit_connection,
    new_source_schema,
    running_stack,
    schema_in,
    snowflake_session,
)

from pgsnow.config import Component, Settings
from pgsnow.demo.compare import TableComparison, compare_table
from pgsnow.demo.pipeline import replicate_table
from pgsnow.extract.run import extract_table
from pgsnow.identifiers import TableRef, quote_qualified
from pgsnow.keys import CONTROL_PREFIX, FileFormat
from pgsnow.ledger import ledger_name
from pgsnow.local.dispatcher import SqsDispatcher
from pgsnow.local.stack import SNOWFLAKE_DATABASE, LocalStack, load_function_handler
from pgsnow.manifest import RunManifest
from pgsnow.postgres import connect
from pgsnow.verify import TableVerification, verify_table


@dataclass
class Delivery:
    """One SQS record as the loader handler received it, and whether the handler failed it."""

    message_id: str
    body: str
    receive_count: int
    failed: bool

    def s3_keys(self) -> list[str]:
        document = json.loads(self.body)
        return [unquote_plus(r["s3"]["object"]["key"]) for r in document.get("Records", [])]


@dataclass
class RecordingLoader:
    """The real loader handler, with every record it was given and its verdict written down."""

    handler: Any
    deliveries: list[Delivery] = field(default_factory=list)

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        try:
            response = self.handler(event, context)
        except Exception:
            # Powertools raises when every record of a batch failed; Lambda then fails them all.
            self._record(event, {r["messageId"] for r in event["Records"]})
            raise
        self._record(event, {f["itemIdentifier"] for f in (response or {}).get("batchItemFailures") or []})
        return response

    def _record(self, event: dict[str, Any], failed_ids: set[str]) -> None:
        for record in event["Records"]:
            self.deliveries.append(
                Delivery(
                    message_id=record["messageId"],
                    body=record["body"],
                    receive_count=int(record["attributes"]["ApproximateReceiveCount"]),
                    failed=record["messageId"] in failed_ids,
                )
            )

    def for_key(self, key: str) -> list[Delivery]:
        return [d for d in self.deliveries if key in d.s3_keys()]


@dataclass
class PipelineHarness:
    """A running local stack, the module's own source schema, and the checks the proof suites share."""

    stack: LocalStack
    source_dsn: str
    schema: str
    setup_conn: PgConnection  # autocommit, for DDL and source writes
    sf_conn: Any

    @property
    def bucket(self) -> str:
        return str(self.stack.resources.bucket)

    @property
    def prefix(self) -> str:
        return str(self.stack.resources.prefix)

    def s3(self) -> Any:
        """The local administrator's S3 client: for seeding and inspecting, not for code under test."""
        return self.stack.aws.client("s3")

    def sqs(self) -> Any:
        """The local administrator's SQS client: for seeding and inspecting, not for code under test."""
        return self.stack.aws.client("sqs")

    def function_s3(self, component: Component) -> Any:
        """``component``'s role's S3 client, for calling a core function directly."""
        return self.stack.function_client(component, "s3")

    def table(self, name: str) -> TableRef:
        return TableRef(self.schema, name)

    def run_sql(self, statement: sql.Composable | str, params: tuple[Any, ...] | None = None) -> None:
        with self.setup_conn.cursor() as cur:
            cur.execute(statement, params)

    def create_table(self, table: TableRef, columns_sql: str, rows_sql: str | None = None) -> None:
        """CREATE TABLE ``table`` (``columns_sql``) and, when given, INSERT INTO it ``rows_sql``."""
        target = sql.Identifier(table.schema, table.table)
        self.run_sql(sql.SQL("CREATE TABLE {} (" + columns_sql + ")").format(target))
        if rows_sql:
            self.run_sql(sql.SQL("INSERT INTO {} " + rows_sql).format(target))

    def replicate_in_each_format(
        self, name: str, columns_sql: str, insert: sql.Composable, rows: list[tuple[Any, ...]]
    ) -> dict[FileFormat, TableRef]:
        """One table per staged format (``{name}_csv``, ``{name}_parquet``), created with
        ``columns_sql``, filled with ``rows`` through ``insert`` (``{}`` is the table), and
        replicated as the demo does: extracted, delivered by the queue to the loader, cleaned."""
        dispatcher = SqsDispatcher(
            self.stack.aws, self.stack.resources.queue_url, load_function_handler("loader")
        )
        tables = {}
        for file_format in (FileFormat.CSV, FileFormat.PARQUET):
            table = self.table(f"{name}_{file_format.value}")
            self.create_table(table, columns_sql)
            for row in rows:
                self.run_sql(insert.format(sql.Identifier(table.schema, table.table)), row)
            replicate_table(self.stack, table, file_format, dispatcher)
            tables[file_format] = table
        return tables

    def replicate(self, table: TableRef, options: dict[str, Any] | None = None) -> RunManifest:
        """Extract ``table`` in CSV (with these table options, or the defaults), let the queue
        deliver its files to the real loader, and require that no delivery failed."""
        env = {"PGSNOW_TABLE_OPTIONS": json.dumps({table.qualified: options})} if options is not None else {}
        manifest = self.extract(table, FileFormat.CSV, **env)
        recorder, dispatcher = self.loader()
        dispatcher.run_until_idle()
        assert [d for d in recorder.deliveries if d.failed] == []
        return manifest

    def merge_again_in_parquet(self, table: TableRef) -> None:
        """Replicate an already replicated table once more, merging, in Parquet (the demo's path)."""
        dispatcher = SqsDispatcher(
            self.stack.aws, self.stack.resources.queue_url, load_function_handler("loader")
        )
        options = json.dumps({table.qualified: {"write_mode": "merge"}})
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(self.stack.env, "PGSNOW_TABLE_OPTIONS", options)
            replicate_table(self.stack, table, FileFormat.PARQUET, dispatcher)

    def compare_cells(self, table: TableRef) -> TableComparison:
        """The demo's independent cell-by-cell comparison of the source with Snowflake."""
        pg_conn = connect(self.source_dsn)
        try:
            return compare_table(pg_conn, self.sf_conn, table, SNOWFLAKE_DATABASE)
        finally:
            pg_conn.close()

    def settings(self, component: Component = Component.EXTRACTOR, **env: str) -> Settings:
        """``component``'s settings as its handler would build them (its function environment,
        docs/local-fidelity.md), with ``env`` over it; ``Component.LOCAL``: the whole stack's."""
        base = self.stack.env if component is Component.LOCAL else self.stack.function_environment(component)
        return Settings.from_env({**base, **env}, component=component)

    def extract(
        self, table: TableRef, file_format: FileFormat = FileFormat.CSV, *, s3: Any = None, **env: str
    ) -> RunManifest:
        """Run the real extractor on its own PostgreSQL connection, as the extractor's role."""
        pg_conn = connect(self.source_dsn)
        try:
            return extract_table(
                settings=self.settings(Component.EXTRACTOR, **env),
                pg_conn=pg_conn,
                s3=s3 or self.function_s3(Component.EXTRACTOR),
                table=table,
                file_format=file_format,
            )
        finally:
            pg_conn.close()

    def loader(self, handler: Any = None) -> tuple[RecordingLoader, SqsDispatcher]:
        recorder = RecordingLoader(handler or load_function_handler("loader"))
        return recorder, SqsDispatcher(
            self.stack.aws, self.stack.resources.queue_url, recorder, wait_seconds=1
        )

    def verify(self, table: TableRef, manifest: RunManifest | None = None) -> TableVerification:
        """``pgsnow verify`` for one table, on a fresh (non-autocommit, one-snapshot) connection."""
        pg_conn = connect(self.source_dsn)
        try:
            return verify_table(pg_conn, self.sf_conn, table, SNOWFLAKE_DATABASE, manifest=manifest)
        finally:
            pg_conn.close()

    def ledger_keys(self, table: TableRef) -> list[str]:
        """The staged files the ledger records as loaded for ``table``. A replace run's or deletes
        run's outcome mark (``applied_mark_key``, under ``_pgsnow/applied/``) is no file: see
        ``applied_marks``."""
        return [key for key in self._loaded_ledger_keys(table) if not key.startswith(f"{CONTROL_PREFIX}/")]

    def applied_marks(self, table: TableRef) -> list[str]:
        """The ledger's marks of ``table``'s runs whose swap or deletes were applied (or superseded)."""
        return [key for key in self._loaded_ledger_keys(table) if key.startswith(f"{CONTROL_PREFIX}/")]

    def _loaded_ledger_keys(self, table: TableRef) -> list[str]:
        ledger = ledger_name(SNOWFLAKE_DATABASE, "PGSNOW", table)
        with self.sf_conn.cursor() as cur:
            cur.execute(
                f'SELECT "S3_KEY" FROM {ledger} WHERE "SCHEMA_NAME" = %s AND "TABLE_NAME" = %s '
                'AND "LOADED_AT" IS NOT NULL ORDER BY "S3_KEY"',
                (table.schema, table.table),
            )
            return [row[0] for row in cur.fetchall()]

    def target_rows(self, table: TableRef, order_by: str = "1") -> list[tuple[Any, ...]]:
        target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
        with self.sf_conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {target} ORDER BY {order_by}")
            return [tuple(row) for row in cur.fetchall()]

    def target_count(self, table: TableRef) -> int:
        target = quote_qualified(SNOWFLAKE_DATABASE, table.snowflake_schema, table.snowflake_table)
        with self.sf_conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {target}")
            row = cur.fetchone()
        return int(row[0])

    def dead_letter_keys(self) -> list[str]:
        """The S3 keys named by every message in the dead-letter queue (left there)."""
        seen: dict[str, str] = {}
        empty_polls = 0
        while empty_polls < 2:
            messages = (
                self.sqs()
                .receive_message(
                    QueueUrl=self.stack.resources.dlq_url,
                    MaxNumberOfMessages=10,
                    VisibilityTimeout=0,
                    WaitTimeSeconds=0,
                )
                .get("Messages", [])
            )
            new = [m for m in messages if m["MessageId"] not in seen]
            seen.update((m["MessageId"], m["Body"]) for m in new)
            empty_polls = 0 if new else empty_polls + 1
        keys: list[str] = []
        for body in seen.values():
            try:
                document = json.loads(body)
            except ValueError:
                continue
            keys += [unquote_plus(r["s3"]["object"]["key"]) for r in document.get("Records", []) if "s3" in r]
        return keys

    def drain_queues(self, max_seconds: float = 60) -> None:
        """Delete every message of the loader queue and its dead-letter queue, waiting for those in
        flight (a redelivery pending its visibility timeout) to come back first."""
        sqs = self.sqs()
        deadline = time.monotonic() + max_seconds
        for queue_url in (self.stack.resources.queue_url, self.stack.resources.dlq_url):
            while True:
                messages = sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
                ).get("Messages", [])
                for message in messages:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                if messages:
                    continue
                if not self._queued(queue_url):
                    break
                assert time.monotonic() < deadline, f"{queue_url} still has messages in flight"
                time.sleep(0.1)  # a poll: in-flight messages come back when their visibility timeout ends

    def _queued(self, queue_url: str) -> int:
        attributes = self.sqs().get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return sum(int(value) for value in attributes.values())

    def receive_notifications(
        self, table: TableRef, expected: int, max_polls: int = 20
    ) -> list[dict[str, Any]]:
        """Take ``table``'s ``expected`` notifications off the queue without delivering them; anything
        else found there (the s3:TestEvent sent when the notification was configured) is dropped."""
        sqs = self.sqs()
        queue_url = self.stack.resources.queue_url
        table_root = f"{self.prefix}/{table.schema}/{table.table}/"
        taken: list[dict[str, Any]] = []
        for _ in range(max_polls):
            if len(taken) >= expected:
                break
            messages = sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
            ).get("Messages", [])
            for message in messages:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            taken += [m for m in messages if any(k.startswith(table_root) for k in self.message_keys(m))]
        assert len(taken) == expected, f"expected {expected} notifications, got {len(taken)}"
        return taken

    @staticmethod
    def message_keys(message: dict[str, Any]) -> list[str]:
        """The decoded S3 keys of a received SQS message's notification."""
        document = json.loads(message["Body"])
        return [unquote_plus(r["s3"]["object"]["key"]) for r in document.get("Records", [])]

    def send_bodies(self, bodies: list[str]) -> None:
        for body in bodies:
            self.sqs().send_message(QueueUrl=self.stack.resources.queue_url, MessageBody=body)


@contextmanager
def harness_on_stack(stack: LocalStack, name: str) -> Iterator[PipelineHarness]:
    """A running ``stack`` shared with other modules, seen as a module's own: a source schema
    ``{name}_<hex>`` in its database (so the module's tables, Snowflake schema and S3 keys are
    its own too), its environment in place for the handlers, a Snowflake session, and its queues
    drained first of any message an earlier module left."""
    with (
        schema_in(stack.pg_dsn, name) as schema,
        autocommit_connection(stack.pg_dsn) as setup_conn,
        stack.handlers(),
        snowflake_session(stack) as sf_conn,
    ):
        harness = PipelineHarness(stack, stack.pg_dsn, schema, setup_conn, sf_conn)
        harness.drain_queues()
        yield harness


@contextmanager
def pipeline_harness(
    name: str, data_dir: Path, *, source_admin_dsn: str | None = None, **stack_options: Any
) -> Iterator[PipelineHarness]:
    """A source schema ``{name}_<hex>``, a local stack started with ``stack_options`` whose
    handlers run as their roles, and a Snowflake session on it; all ended afterwards.
    ``source_admin_dsn`` names another PostgreSQL server than the local one for the source."""
    with (
        new_source_schema(name, source_admin_dsn) as (source_dsn, schema),
        autocommit_connection(source_dsn) as setup_conn,
        running_stack(
            source_dsn,
            data_dir,
            name.replace("_", "-")[:14],
            for_handlers=True,
            visibility_timeout=VISIBILITY_TIMEOUT_S,
            max_receive_count=MAX_RECEIVE_COUNT,
            **stack_options,
        ) as local,
        snowflake_session(local) as sf_conn,
    ):
        yield PipelineHarness(local, source_dsn, schema, setup_conn, sf_conn)
