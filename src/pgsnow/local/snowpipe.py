"""A local Snowpipe REST endpoint: the three calls the ``snowflake-ingest`` SDK makes.

* ``POST /v1/data/pipes/{pipe}/insertFiles?requestId=`` with ``{"files": [{"path", "size"}]}``
  -> ``{"requestId", "responseCode": "SUCCESS"}``; the files are queued and loaded by a worker
  thread (asynchronously, as Snowpipe does), each file on its own with the pipe's stored COPY
  (``CREATE PIPE`` on the local Snowflake) and ``FILES = ('<path>')``.
* ``GET /v1/data/pipes/{pipe}/insertReport?requestId=&recentSeconds=&beginMark=`` -> the
  pipe's recent file events after ``beginMark``, and ``nextBeginMark``.
* ``GET /v1/data/pipes/{pipe}/loadHistoryScan?startTimeInclusive=&endTimeExclusive=`` -> the
  events whose last insert time falls in the range.

Every call carries ``Authorization: Bearer <JWT>``. The token must be RS256-signed by the
private key whose public key was registered for the user (``register_public_key`` or
``ALTER USER ... SET RSA_PUBLIC_KEY`` on the local Snowflake: one registry, checked by
``pgsnow.local.keypair`` for SQL logins too), with ``sub`` = ``ACCOUNT.USER``,
``iss`` = ``ACCOUNT.USER.SHA256:<base64 sha256 of the DER public key>`` and an ``exp`` in the
future; anything else is HTTP 401, as Snowflake answers.

Like Snowpipe's load metadata, a path the pipe already loaded is not loaded again when it is
submitted again (no new event); a failed one may be retried.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from snowflake.connector.errors import ProgrammingError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgsnow.local.keypair import INVALID_JWT_CODE, INVALID_JWT_MESSAGE
from pgsnow.local.sf_copy_sql import CopySyntaxError, parse_copy
from pgsnow.local.snowflake import LOCAL_ACCOUNT, LocalSnowflake
from pgsnow.timestamps import utc_iso

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 30.0
DEFAULT_RECENT_SECONDS = 600  # insertReport covers the last 10 minutes, like Snowpipe's
PIPE_NOT_FOUND_CODE = "390404"


def _parse_iso(text: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class PipeEvent:
    """One file's load event, as insertReport and loadHistoryScan report it."""

    sequence: int
    path: str
    stage_location: str
    file_size: int
    time_received: dt.datetime
    last_insert_time: dt.datetime
    status: str
    rows_inserted: int
    rows_parsed: int
    errors_seen: int
    error_limit: int
    first_error: str | None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "path": self.path,
            "stageLocation": self.stage_location,
            "fileSize": self.file_size,
            "timeReceived": utc_iso(self.time_received, "milliseconds"),
            "lastInsertTime": utc_iso(self.last_insert_time, "milliseconds"),
            "rowsInserted": self.rows_inserted,
            "rowsParsed": self.rows_parsed,
            "errorsSeen": self.errors_seen,
            "errorLimit": self.error_limit,
            "complete": True,
            "status": self.status,
        }
        if self.first_error is not None:
            body["firstError"] = self.first_error
        return body


@dataclass
class LocalSnowpipeState:
    snowflake: LocalSnowflake
    account: str
    events: dict[tuple[str, str, str], list[PipeEvent]] = field(default_factory=dict)
    work: queue.Queue[tuple[tuple[str, str, str], str, int, dt.datetime] | None] = field(
        default_factory=queue.Queue
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    held: threading.Event = field(default_factory=threading.Event)  # tests: submitted, not yet loaded
    sequence: int = 0

    # -- auth

    def authenticate(self, request: Request) -> str | None:
        """The user a valid token belongs to, or None."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        return self.snowflake.public_keys.verify(header[len("Bearer ") :], account=self.account)

    # -- pipes

    def pipe_copy(self, pipe: tuple[str, str, str]) -> str | None:
        return self.snowflake._state.pipe_copy_sql(*pipe)

    def submit(self, pipe: tuple[str, str, str], files: list[tuple[str, int]]) -> None:
        received = dt.datetime.now(dt.UTC)
        for path, size in files:
            self.work.put((pipe, path, size, received))

    def run_worker(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            while self.held.is_set():
                time.sleep(0.05)
            pipe, path, size, received = item
            try:
                self._load(pipe, path, size, received)
            except Exception:  # a worker must survive one bad file; the log says why
                logger.exception("local Snowpipe failed on %s", path)

    def _already_loaded(self, pipe: tuple[str, str, str], path: str) -> bool:
        with self.lock:
            return any(
                e.path == path and e.status in {"LOADED", "PARTIALLY_LOADED"}
                for e in self.events.get(pipe, [])
            )

    def _load(self, pipe: tuple[str, str, str], path: str, size: int, received: dt.datetime) -> None:
        if self._already_loaded(pipe, path):
            return  # Snowpipe's load metadata: the same path is not loaded twice
        copy_sql = self.pipe_copy(pipe)
        status, rows_parsed, rows_loaded, errors_seen, first_error = "LOAD_FAILED", 0, 0, 1, None
        stage_location = ""
        if copy_sql is None:
            first_error = f"pipe {'.'.join(pipe)} no longer exists"
        else:
            conn = self.snowflake._state.fs.connect(pipe[0], pipe[1], autocommit=True)
            try:
                statement = parse_copy(copy_sql)
                assert statement is not None  # CREATE PIPE only stores a COPY
                # Pipe load metadata, not the table's, decides (above): FORCE for the table's.
                statement = dataclasses.replace(statement, files=(path,), force=True)
                outcome = self.snowflake._state.copy_files(conn, statement)
                if outcome:
                    result = outcome[0]
                    stage_location = result.url.removesuffix(path)
                    status = result.status
                    rows_parsed, rows_loaded = result.rows_parsed, result.rows_loaded
                    errors_seen, first_error = result.errors_seen, result.first_error
                else:
                    first_error = f"file {path} not found at the pipe's stage location"
            except (ProgrammingError, CopySyntaxError) as error:
                first_error = getattr(error, "msg", None) or str(error)
            finally:
                conn.close()
        with self.lock:
            self.sequence += 1
            event = PipeEvent(
                self.sequence,
                path,
                stage_location,
                size,
                received,
                dt.datetime.now(dt.UTC),
                status,
                rows_loaded,
                rows_parsed,
                errors_seen,
                1,
                first_error,
            )
            self.events.setdefault(pipe, []).append(event)

    def report(self, pipe: tuple[str, str, str], *, recent_seconds: int, begin_mark: int) -> dict[str, Any]:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=recent_seconds)
        with self.lock:
            events = [e for e in self.events.get(pipe, []) if e.sequence > begin_mark]
            last = self.sequence
        return {
            "pipe": ".".join(pipe),
            "completeResult": True,
            "nextBeginMark": str(max([begin_mark, *(e.sequence for e in events)], default=last)),
            "files": [e.as_json() for e in events if e.last_insert_time >= since],
        }

    def scan(self, pipe: tuple[str, str, str], start: dt.datetime, end: dt.datetime | None) -> dict[str, Any]:
        with self.lock:
            events = [
                e
                for e in self.events.get(pipe, [])
                if e.last_insert_time >= start and (end is None or e.last_insert_time < end)
            ]
        return {
            "pipe": ".".join(pipe),
            "completeResult": "true",
            "startTimeInclusive": utc_iso(start, "milliseconds"),
            "endTimeExclusive": utc_iso(end or dt.datetime.now(dt.UTC), "milliseconds"),
            "files": [e.as_json() for e in events],
        }


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"data": None, "code": code, "message": message, "success": False, "headers": None},
        status_code=status,
    )


def _pipe_parts(name: str) -> tuple[str, str, str] | None:
    parts = name.split(".")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def build_app(state: LocalSnowpipeState) -> Starlette:
    async def checked(request: Request) -> tuple[tuple[str, str, str] | None, Response | None]:
        if state.authenticate(request) is None:
            return None, _error(401, INVALID_JWT_CODE, INVALID_JWT_MESSAGE)
        pipe = _pipe_parts(request.path_params["pipe"])
        if pipe is None or await run_in_threadpool(state.pipe_copy, pipe) is None:
            return None, _error(
                404, PIPE_NOT_FOUND_CODE, "Specified object does not exist or not authorized."
            )
        return pipe, None

    async def insert_files(request: Request) -> Response:
        pipe, refused = await checked(request)
        if refused is not None or pipe is None:
            return refused or _error(404, PIPE_NOT_FOUND_CODE, "no pipe")
        body = await request.json()
        files = [(str(f["path"]), int(f.get("size") or 0)) for f in body.get("files") or []]
        if not files:
            return _error(400, "390400", "no files given")
        state.submit(pipe, files)
        return JSONResponse(
            {"requestId": request.query_params.get("requestId", str(uuid.uuid4())), "responseCode": "SUCCESS"}
        )

    async def insert_report(request: Request) -> Response:
        pipe, refused = await checked(request)
        if refused is not None or pipe is None:
            return refused or _error(404, PIPE_NOT_FOUND_CODE, "no pipe")
        recent = int(request.query_params.get("recentSeconds") or DEFAULT_RECENT_SECONDS)
        begin_mark = int(request.query_params.get("beginMark") or 0)
        return JSONResponse(state.report(pipe, recent_seconds=recent, begin_mark=begin_mark))

    async def load_history_scan(request: Request) -> Response:
        pipe, refused = await checked(request)
        if refused is not None or pipe is None:
            return refused or _error(404, PIPE_NOT_FOUND_CODE, "no pipe")
        start_text = request.query_params.get("startTimeInclusive")
        if not start_text:
            return _error(400, "390400", "startTimeInclusive is required")
        end_text = request.query_params.get("endTimeExclusive")
        return JSONResponse(
            state.scan(pipe, _parse_iso(start_text), _parse_iso(end_text) if end_text else None)
        )

    return Starlette(
        routes=[
            Route("/v1/data/pipes/{pipe}/insertFiles", insert_files, methods=["POST"]),
            Route("/v1/data/pipes/{pipe}/insertReport", insert_report, methods=["GET"]),
            Route("/v1/data/pipes/{pipe}/loadHistoryScan", load_history_scan, methods=["GET"]),
        ]
    )


@dataclass(frozen=True)
class LocalSnowpipe:
    """A running local Snowpipe REST endpoint; ``url`` is what ``SNOWPIPE_HOST`` takes."""

    host: str
    port: int
    _server: uvicorn.Server = field(repr=False, compare=False)
    _thread: threading.Thread = field(repr=False, compare=False)
    _worker: threading.Thread = field(repr=False, compare=False)
    state: LocalSnowpipeState = field(repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def register_public_key(self, user: str, public_key_pem: str | bytes) -> str:
        """``ALTER USER <user> SET RSA_PUBLIC_KEY = ...`` on the local Snowflake this endpoint loads into.

        Returns the key's fingerprint (Snowflake's RSA_PUBLIC_KEY_FP)."""
        return self.state.snowflake.public_keys.register(user, public_key_pem)

    def hold(self) -> None:
        """Accept submissions but load nothing until ``release`` (a slow Snowpipe, for tests)."""
        self.state.held.set()

    def release(self) -> None:
        self.state.held.clear()

    def stop(self) -> None:
        self.state.held.clear()
        self.state.work.put(None)
        self._worker.join(timeout=STARTUP_TIMEOUT_SECONDS)
        self._server.should_exit = True
        self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)


def start_local_snowpipe(
    snowflake: LocalSnowflake, *, account: str = LOCAL_ACCOUNT, port: int = 0
) -> LocalSnowpipe:
    """Serve Snowpipe REST on 127.0.0.1 (port 0: any free port), loading into ``snowflake``."""
    state = LocalSnowpipeState(snowflake, account)
    host = "127.0.0.1"
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on each accepted connection (see local/snowflake.py)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    bound_port = int(listener.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name=f"local-snowpipe:{bound_port}", daemon=True
    )
    worker = threading.Thread(target=state.run_worker, name="local-snowpipe-loader", daemon=True)
    thread.start()
    worker.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            state.work.put(None)
            raise RuntimeError(f"local Snowpipe did not start on {host}:{bound_port}")
        time.sleep(0.02)
    logger.info("local Snowpipe listening on %s:%s", host, bound_port)
    return LocalSnowpipe(host, bound_port, server, thread, worker, state)
