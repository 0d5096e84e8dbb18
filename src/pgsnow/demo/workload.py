"""A writer for the sample shop while change capture runs: the changes CDC pipelines get wrong.

``Workload`` commits transactions of varied size into the shop's tables at a target rate of
changes per second until stopped, and counts what each change really did (by row count, not
by intent):

* inserts into every table (customers get a large note, orders are stamped ``clock_timestamp()``
  in ``ordered_at`` so a benchmark can time commit-to-visible);
* updates, including writes of large TOASTed values: random hex longer than 8 KB, which pglz
  cannot shrink below the TOAST threshold, so the value is stored out of line;
* updates that leave such a TOASTed column unchanged: pgoutput then sends the column as
  "unchanged" (``u``) instead of its value, which a replica must keep, never NULL;
* deletes (single rows and a whole order's lines);
* primary-key updates, including of a customer with a TOASTed note (the value is found on the old key).

The first transactions go through every kind of change once, so even a short run has each of
them; after that the kinds and transaction sizes are drawn from a seeded generator.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg2
from psycopg2 import sql

from pgsnow.errors import PermanentError

# Longer than 8 KB once written; random hex so pglz finds nothing to compress and TOAST stores it out of line.
BIG_VALUE_HEX_CHARS = 10_240
# Transaction sizes (changes per transaction) drawn uniformly: mostly small, some large.
TRANSACTION_SIZES = (1, 1, 2, 3, 5, 8, 20, 50, 200)
# New keys start far above the generated rows (and below the extremes the shop holds at the bigint limits).
NEW_KEY_BASE = 1_000_000_000


@dataclass
class WorkloadCounts:
    """What the workload's committed transactions did, counted by affected rows."""

    transactions: int = 0
    changes: int = 0
    inserts: int = 0
    updates: int = 0
    toast_writes: int = 0  # updates and inserts that wrote a > 8 KB incompressible value
    unchanged_toast_updates: int = 0  # updates of a row whose TOASTed note they left as it was
    deletes: int = 0
    pk_updates: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# Every kind of change the workload makes (a subset can be chosen: ``kinds``).
KINDS = (
    "insert_customer",
    "insert_order",
    "update_order",
    "update_product",
    "write_toast",
    "keep_toast",
    "delete_lines",
    "delete_customer",
    "move_order_key",
    "move_customer_key",
)


class Workload:
    """Writes into ``schema``'s sample shop at about ``rate`` changes per second until ``stop()``."""

    def __init__(
        self,
        dsn: str,
        schema: str = "shop",
        *,
        rate: float = 200.0,
        seed: int = 15,
        max_transactions: int | None = None,
        kinds: tuple[str, ...] = KINDS,
    ) -> None:
        if rate <= 0:
            raise PermanentError(f"workload rate must be > 0 changes/s, got {rate}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise PermanentError(f"workload kinds must be some of {', '.join(KINDS)}; got {', '.join(kinds)}")
        self.kinds = kinds
        self.dsn = dsn
        self.schema = schema
        self.rate = rate
        self.max_transactions = max_transactions
        self._random = random.Random(seed)  # noqa: S311 - a reproducible workload, not secrets
        self._counts = WorkloadCounts()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._toasted: list[int] = []  # customers whose note the workload made a TOASTed value
        self._next_key = 0
        self._attempts = 0  # changes tried, committed or not: the first len(KINDS) go through every kind
        self._max_customer = 0
        self._max_order = 0
        self._max_product = 0

    # ------------------------------------------------------------------ control

    @property
    def counts(self) -> WorkloadCounts:
        with self._lock:
            return WorkloadCounts(**self._counts.as_dict())

    def start(self) -> None:
        """Write on a thread of its own until ``stop()`` (or ``max_transactions``)."""
        if self._thread is not None:
            raise PermanentError("the workload is already running")
        self._stopping.clear()
        # Connected and checked here, so a shop without rows fails the caller now, not at stop().
        conn = self._connect()
        self._thread = threading.Thread(
            target=self._run_guarded, args=(conn,), name="pgsnow-demo-workload", daemon=True
        )
        self._thread.start()

    def stop(self) -> WorkloadCounts:
        """Stop after the transaction in progress commits; re-raises a failure of the writer."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self.counts

    def run(self, seconds: float) -> WorkloadCounts:
        """Write in this thread for ``seconds`` (or until ``max_transactions``)."""
        timer = threading.Timer(seconds, self._stopping.set)
        timer.start()
        try:
            self._run()
        finally:
            timer.cancel()
        return self.counts

    # ------------------------------------------------------------------ writing

    def _run_guarded(self, conn: Any) -> None:
        try:
            self._run(conn)
        except BaseException as exc:  # reported by stop() in the caller's thread
            self._error = exc

    def _connect(self) -> Any:
        conn = psycopg2.connect(self.dsn)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, conn: Any | None = None) -> None:
        conn = conn or self._connect()
        try:
            started = time.monotonic()
            done = 0
            while not self._stopping.is_set():
                if self.max_transactions is not None and self.counts.transactions >= self.max_transactions:
                    break
                size = self._random.choice(TRANSACTION_SIZES)
                counts = WorkloadCounts(transactions=1)
                with conn.cursor() as cur:
                    for _ in range(size):
                        self._one_change(cur, counts)
                conn.commit()
                with self._lock:
                    for name, value in counts.as_dict().items():
                        setattr(self._counts, name, getattr(self._counts, name) + value)
                done += size
                # Pace to the rate: sleep until the changes so far are due (never faster, bursts allowed).
                ahead = done / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    self._stopping.wait(ahead)
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def _prepare(self, conn: Any) -> None:
        """The key ranges to draw existing rows from, and where new keys start."""
        with conn.cursor() as cur:
            limit = NEW_KEY_BASE
            cur.execute(
                sql.SQL(
                    "SELECT coalesce(max(customer_id), 0) FROM {} WHERE customer_id BETWEEN 1 AND %s"
                ).format(self._table("customers")),
                (limit,),
            )
            self._max_customer = int(cur.fetchone()[0])
            cur.execute(
                sql.SQL("SELECT coalesce(max(order_id), 0) FROM {} WHERE order_id BETWEEN 1 AND %s").format(
                    self._table("orders")
                ),
                (limit,),
            )
            self._max_order = int(cur.fetchone()[0])
            cur.execute(
                sql.SQL(
                    "SELECT coalesce(max(product_id), 0) FROM {} WHERE product_id BETWEEN 1 AND %s"
                ).format(self._table("products")),
                (limit,),
            )
            self._max_product = int(cur.fetchone()[0])
            # Keys above every key a previous workload gave (so a second run in one database never collides).
            cur.execute(
                sql.SQL(
                    "SELECT greatest((SELECT max(customer_id) FROM {c} WHERE customer_id BETWEEN %s AND %s), "
                    "(SELECT max(order_id) FROM {o} WHERE order_id BETWEEN %s AND %s))"
                ).format(c=self._table("customers"), o=self._table("orders")),
                (NEW_KEY_BASE, 4 * NEW_KEY_BASE, NEW_KEY_BASE, 4 * NEW_KEY_BASE),
            )
            found = cur.fetchone()[0]
            self._next_key = int(found) + 1 if found is not None else NEW_KEY_BASE
        conn.commit()
        if self._max_customer < 1 or self._max_order < 1:
            raise PermanentError(f"the workload needs the sample shop's rows in schema {self.schema!r}")

    def _new_key(self) -> int:
        key = self._next_key
        self._next_key += 1
        return key

    def _one_change(self, cur: Any, counts: WorkloadCounts) -> None:
        position = self._attempts
        self._attempts += 1
        kinds = self.kinds
        kind = kinds[position] if position < len(kinds) else self._random.choice(kinds)
        affected = getattr(self, f"_{kind}")(cur, counts)
        counts.changes += affected

    def _big_hex(self) -> sql.Composable:
        # md5 of random() per 32 characters: server-side, incompressible, > 8 KB.
        return sql.SQL("(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, {}))").format(
            sql.Literal(BIG_VALUE_HEX_CHARS // 32)
        )

    def _insert_customer(self, cur: Any, counts: WorkloadCounts) -> int:
        key = self._new_key()
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (customer_id, external_id, full_name, email, note, is_active, loyalty_points, "
                "signup_date, created_at) VALUES (%s, md5(%s)::uuid, %s, %s, {}, true, 0, current_date, "
                "clock_timestamp())"
            ).format(self._table("customers"), self._big_hex()),
            (key, f"workload{key}", f"Workload customer {key}", f"w{key}@example.com"),
        )
        counts.inserts += cur.rowcount
        counts.toast_writes += cur.rowcount
        if cur.rowcount:
            self._toasted.append(key)
        return int(cur.rowcount)

    def _insert_order(self, cur: Any, counts: WorkloadCounts) -> int:
        key = self._new_key()
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, customer_id, ordered_at, status, shipping_address, total, gift, "
                "metadata) VALUES (%s, %s, clock_timestamp(), 'new', %s, %s, false, %s)"
            ).format(self._table("orders")),
            (
                key,
                self._random.randint(1, self._max_customer),
                '1 Workload Way, "Quoted", line\nbreak',
                f"{self._random.randint(1, 99999)}.{self._random.randint(0, 99):02d}",
                '{"source": "workload"}',
            ),
        )
        lines = self._random.randint(1, 4)
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, line_no, product_id, quantity, unit_price, discount, note) "
                "SELECT %s, l, 1 + (l * 7) %% 100, l, 9.99, NULL, 'line ' || l FROM generate_series(1, %s) AS l"
            ).format(self._table("order_lines")),
            (key, lines),
        )
        counts.inserts += 1 + cur.rowcount
        return 1 + int(cur.rowcount)

    def _update_order(self, cur: Any, counts: WorkloadCounts) -> int:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET status = %s, delivered_on = current_date, total = coalesce(total, 0) + 1 "
                "WHERE order_id = %s"
            ).format(self._table("orders")),
            (self._random.choice(("paid", "shipped", "delivered")), self._random.randint(1, self._max_order)),
        )
        counts.updates += cur.rowcount
        return int(cur.rowcount)

    def _update_product(self, cur: Any, counts: WorkloadCounts) -> int:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET unit_price = unit_price + 0.01, rating = %s, discontinued = NOT coalesce(discontinued, "
                "false) WHERE product_id = %s"
            ).format(self._table("products")),
            (self._random.random() * 5, self._random.randint(1, max(self._max_product, 1))),
        )
        counts.updates += cur.rowcount
        return int(cur.rowcount)

    def _write_toast(self, cur: Any, counts: WorkloadCounts) -> int:
        key = self._random.randint(1, self._max_customer)
        cur.execute(
            sql.SQL("UPDATE {} SET note = {} WHERE customer_id = %s").format(
                self._table("customers"), self._big_hex()
            ),
            (key,),
        )
        counts.updates += cur.rowcount
        counts.toast_writes += cur.rowcount
        if cur.rowcount and key not in self._toasted:
            self._toasted.append(key)
        return int(cur.rowcount)

    def _keep_toast(self, cur: Any, counts: WorkloadCounts) -> int:
        if not self._toasted:
            return 0  # nothing stored out of line yet: the next change (or transaction) makes some
        key = self._random.choice(self._toasted)
        # Only a row whose note really is stored out of line counts: its update leaves the note unchanged.
        cur.execute(
            sql.SQL(
                "UPDATE {} SET loyalty_points = loyalty_points + 1, last_login = localtimestamp "
                "WHERE customer_id = %s AND octet_length(note) > 8192"
            ).format(self._table("customers")),
            (key,),
        )
        counts.updates += cur.rowcount
        counts.unchanged_toast_updates += cur.rowcount
        return int(cur.rowcount)

    def _delete_lines(self, cur: Any, counts: WorkloadCounts) -> int:
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE order_id = %s").format(self._table("order_lines")),
            (self._random.randint(1, self._max_order),),
        )
        counts.deletes += cur.rowcount
        return int(cur.rowcount)

    def _delete_customer(self, cur: Any, counts: WorkloadCounts) -> int:
        # A TOASTed one when there is one: its delete must remove the row, not leave the note behind.
        key = self._toasted.pop(0) if len(self._toasted) > 2 else self._random.randint(1, self._max_customer)
        cur.execute(sql.SQL("DELETE FROM {} WHERE customer_id = %s").format(self._table("customers")), (key,))
        counts.deletes += cur.rowcount
        return int(cur.rowcount)

    def _move_order_key(self, cur: Any, counts: WorkloadCounts) -> int:
        cur.execute(
            sql.SQL("UPDATE {} SET order_id = %s, status = 'moved' WHERE order_id = %s").format(
                self._table("orders")
            ),
            (self._new_key(), self._random.randint(1, self._max_order)),
        )
        counts.updates += cur.rowcount
        counts.pk_updates += cur.rowcount
        return int(cur.rowcount)

    def _move_customer_key(self, cur: Any, counts: WorkloadCounts) -> int:
        if not self._toasted:
            return 0
        old = self._toasted.pop(self._random.randrange(len(self._toasted)))
        new = self._new_key()
        # The note is not set: a key move whose TOASTed value pgoutput sends as unchanged.
        cur.execute(
            sql.SQL("UPDATE {} SET customer_id = %s WHERE customer_id = %s").format(self._table("customers")),
            (new, old),
        )
        if cur.rowcount:
            self._toasted.append(new)
        counts.updates += cur.rowcount
        counts.pk_updates += cur.rowcount
        return int(cur.rowcount)
