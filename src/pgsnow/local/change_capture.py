"""The change-capture schedule, locally: the drain invoked as its Lambda is, on demand or every N seconds.

Deployed, an EventBridge schedule invokes ``ChangeCaptureFunction`` (handler
``app.change_capture_handler`` of the extractor's code, reserved concurrency 1) every minute.
``LocalChangeCapture`` does the same in this process: it calls that handler from this
repository's ``extractor/app.py`` with a scheduled event and a Lambda context whose deadline is
the function's timeout. Run it inside ``LocalStack.handlers()``: the handler then reads the
stack's environment (``CDC_PUBLICATION``, ``CDC_SLOT``, ...) and builds its AWS clients from the
role the template gives ``ChangeCaptureFunction`` (``pgsnow.local.iam``), as the loader and the
extractor do. Runs never overlap: the reserved concurrency of 1 is a lock here.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pgsnow.changes import parse_lsn
from pgsnow.errors import ConfigError, RetryableError
from pgsnow.local.dispatcher import LambdaContext
from pgsnow.local.iam import FUNCTION_RESOURCES, LOCAL_ACCOUNT_ID
from pgsnow.observability import logger

CHANGE_CAPTURE_RESOURCE = "ChangeCaptureFunction"  # the template's logical id
CHANGE_CAPTURE_HANDLER = "change_capture_handler"  # in extractor/app.py (same code artifact)
# The template's Timeout and MemorySize for the function (tests/unit/test_template.py checks they agree).
CHANGE_CAPTURE_TIMEOUT_S = 900
CHANGE_CAPTURE_MEMORY_MB = 2048
FUNCTION_NAME = "pgsnow-change-capture"
# Runs allowed to reach a position before giving up (each run drains up to CDC_MAX_MB).
CATCH_UP_MAX_RUNS = 50


def schedule_event(rule_arn: str) -> dict[str, Any]:
    """The event an EventBridge schedule rule sends its target."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": LOCAL_ACCOUNT_ID,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": [rule_arn],
        "detail": {},
    }


class LocalChangeCapture:
    """The change-capture function of a running local stack: ``run_once()`` or every ``interval_s``."""

    def __init__(
        self,
        stack: Any,
        *,
        interval_s: float = 60.0,
        handler: Callable[[dict[str, Any], Any], Any] | None = None,
        on_run: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from pgsnow.local.stack import load_function_handler

        if interval_s <= 0:
            raise ConfigError([f"the change-capture interval must be > 0 s, got {interval_s}"])
        components = [
            c for c, logical_id in FUNCTION_RESOURCES.items() if logical_id == CHANGE_CAPTURE_RESOURCE
        ]
        if not components or components[0] not in stack.sessions:
            # Without its own role the drain would run with another function's permissions,
            # which would hide a permission the template forgot.
            raise ConfigError(
                [f"the local stack has no role for {CHANGE_CAPTURE_RESOURCE} (the template must declare it)"]
            )
        self.stack = stack
        self.interval_s = interval_s
        self.handler = handler or load_function_handler("extractor", CHANGE_CAPTURE_HANDLER)
        self.on_run = on_run
        self.outcomes: list[dict[str, Any]] = []
        self._one_at_a_time = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def slot(self) -> str:
        return str(self.stack.env.get("CDC_SLOT") or self.stack.settings().cdc.slot)

    def run_once(self) -> dict[str, Any]:
        """One scheduled invocation; returns the handler's outcome (the drain's run summary)."""
        with self._one_at_a_time:
            context = LambdaContext.for_invocation(
                FUNCTION_NAME, memory_mb=CHANGE_CAPTURE_MEMORY_MB, timeout_s=CHANGE_CAPTURE_TIMEOUT_S
            )
            event = schedule_event(f"arn:aws:events:us-east-1:{LOCAL_ACCOUNT_ID}:rule/pgsnow-change-capture")
            outcome = self.handler(event, context)
            result = dict(outcome) if isinstance(outcome, dict) else {"result": outcome}
            self.outcomes.append(result)
        if self.on_run is not None:
            self.on_run(result)
        return result

    def confirmed_lsn(self) -> int | None:
        """The slot's confirmed position, as PostgreSQL reports it (None before any confirmation)."""
        from pgsnow.cdc.slot import slot_health
        from pgsnow.postgres import connect

        conn = connect(self.stack.pg_dsn)
        try:
            health = slot_health(conn, self.slot)
        finally:
            conn.rollback()
            conn.close()
        if not health.exists:
            raise ConfigError([f"replication slot {self.slot!r} does not exist"])
        return health.confirmed_flush_lsn

    def current_wal_lsn(self) -> int:
        from pgsnow.postgres import connect

        conn = connect(self.stack.pg_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_current_wal_lsn()::text")
                row = cur.fetchone()
        finally:
            conn.rollback()
            conn.close()
        return parse_lsn(str(row[0])) if row else 0

    def drain_until_caught_up(self, target_lsn: int | None = None) -> list[dict[str, Any]]:
        """Run until the slot has confirmed ``target_lsn`` (default: the end of WAL now), i.e. every
        change committed before this call is staged. Returns the runs' outcomes."""
        target = self.current_wal_lsn() if target_lsn is None else target_lsn
        runs: list[dict[str, Any]] = []
        for _ in range(CATCH_UP_MAX_RUNS):
            runs.append(self.run_once())
            confirmed = self.confirmed_lsn()
            if confirmed is not None and confirmed >= target:
                return runs
        raise RetryableError(
            f"slot {self.slot!r} did not reach {target} in {CATCH_UP_MAX_RUNS} change-capture runs; "
            f"last outcome: {runs[-1] if runs else None}"
        )

    # ------------------------------------------------------------------ the schedule

    def start(self) -> None:
        """Invoke every ``interval_s`` on a thread (the first run one interval from now)."""
        if self._thread is not None:
            raise ConfigError(["the local change-capture schedule is already running"])
        self._stopping.clear()
        self._thread = threading.Thread(target=self._schedule, name="pgsnow-change-capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the schedule after a run in progress ends; re-raises a run's failure."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _schedule(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # Lambda would retry on the next tick; stop() reports it
                logger.exception("local change-capture run failed", extra={"slot": self.slot})
                self._error = exc
                return
