"""Snowpipe REST (``LOAD_METHOD=snowpipe``): submit staged files to a pipe and confirm their load.

The loader talks to Snowpipe through the official ``snowflake-ingest`` SDK with key-pair (JWT)
auth: ``insertFiles`` submits the files, ``insertReport`` (recent events) and
``loadHistoryScan`` (a time range, for files submitted by an earlier, interrupted attempt)
confirm them. A file is only recorded in the ledger once Snowpipe reports it ``LOADED``; see
docs/loading.md ("Snowpipe").

One pipe per target table (a pipe's COPY has one target), in the control schema, named
``{SNOWPIPE_NAME}_{SCHEMA}_{TABLE}`` (``pgsnow.setup_sql.pipe_name``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pgsnow.config import SnowflakeSettings
from pgsnow.errors import ConfigError, PermanentError, RetryableError
from pgsnow.identifiers import TableRef
from pgsnow.setup_sql import pipe_name
from pgsnow.timestamps import utc_iso

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from snowflake.ingest import SimpleIngestManager

# insertReport/loadHistoryScan file statuses; everything but LOAD_IN_PROGRESS is final.
FINAL_STATUSES = frozenset({"LOADED", "LOAD_FAILED", "PARTIALLY_LOADED"})
DEFAULT_CONFIRM_TIMEOUT_S = 120.0
DEFAULT_POLL_INTERVAL_S = 1.0
# loadHistoryScan starts this long before the recorded submission (clock skew between us and Snowflake).
HISTORY_SCAN_SLACK = dt.timedelta(minutes=5)
_PERMANENT_HTTP = frozenset({400, 401, 403, 404})


@dataclass(frozen=True)
class SnowpipeEndpoint:
    scheme: str
    host: str
    port: int


def snowpipe_endpoint(snowpipe_host: str | None, account: str) -> SnowpipeEndpoint:
    """``SNOWPIPE_HOST``: a host name (https, 443), or a URL ``http://127.0.0.1:8080`` (local stack).

    Unset: the account's own host, as the SDK computes it.
    """
    if not snowpipe_host:
        return SnowpipeEndpoint("https", f"{account}.snowflakecomputing.com", 443)
    if "://" not in snowpipe_host:
        return SnowpipeEndpoint("https", snowpipe_host, 443)
    url = urlparse(snowpipe_host)
    if url.scheme not in {"http", "https"} or not url.hostname:
        raise ConfigError([f"SNOWPIPE_HOST must be a host name or an http(s) URL, got {snowpipe_host!r}"])
    return SnowpipeEndpoint(url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80))


def qualified_pipe_name(database: str, control_schema: str, prefix: str, table: TableRef) -> str:
    """The pipe as the REST API names it: ``database.schema.pipe``, stored names, case-sensitive."""
    return f"{database}.{control_schema}.{pipe_name(prefix, table)}"


@dataclass(frozen=True)
class PipeFileReport:
    """One file's entry in insertReport/loadHistoryScan."""

    path: str
    status: str
    rows_inserted: int
    rows_parsed: int
    errors_seen: int
    first_error: str | None
    last_insert_time: str

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> PipeFileReport:
        return cls(
            path=str(body.get("path", "")),
            status=str(body.get("status", "")).upper(),
            rows_inserted=int(body.get("rowsInserted") or 0),
            rows_parsed=int(body.get("rowsParsed") or 0),
            errors_seen=int(body.get("errorsSeen") or 0),
            first_error=None if body.get("firstError") is None else str(body["firstError"]),
            last_insert_time=str(body.get("lastInsertTime") or body.get("timeReceived") or ""),
        )


@dataclass(kw_only=True, eq=False)  # compared by identity, like the connection it stands for
class SnowpipeClient:
    """insertFiles / insertReport / loadHistoryScan through the SDK, errors sorted retryable vs permanent."""

    account: str
    user: str
    private_key_pem: str = field(repr=False)  # signs the JWT: never in a log line
    endpoint: SnowpipeEndpoint
    confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S

    def _manager(self, pipe: str) -> SimpleIngestManager:
        from snowflake.ingest import SimpleIngestManager

        return SimpleIngestManager(
            account=self.account,
            user=self.user,
            pipe=pipe,
            private_key=self.private_key_pem,
            scheme=self.endpoint.scheme,
            host=self.endpoint.host,
            port=self.endpoint.port,
        )

    def submit(self, pipe: str, files: Sequence[tuple[str, int]]) -> None:
        """insertFiles: the paths are relative to the pipe's stage location (the table's folder)."""
        from snowflake.ingest.simple_ingest_manager import StagedFile

        staged = [StagedFile(path, size) for path, size in files]
        response = _call(pipe, self._manager(pipe).ingest_files, staged)
        if str(response.get("responseCode", "")).upper() != "SUCCESS":
            raise RetryableError(f"Snowpipe did not accept the files: {response.get('responseCode')}")

    def confirm(
        self, pipe: str, paths: Iterable[str], *, submitted_since: dt.datetime | None = None
    ) -> dict[str, PipeFileReport]:
        """Poll until every path has a final status; the newest entry per path.

        ``submitted_since``: the earliest time an earlier attempt submitted some of these files;
        insertReport only covers recent events, so those are also looked up with loadHistoryScan.
        A path still without a final status at the deadline is a ``RetryableError``.
        """
        wanted = set(paths)
        found: dict[str, PipeFileReport] = {}
        manager = self._manager(pipe)  # keeps insertReport's beginMark between polls
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            entries = list(_call(pipe, manager.get_history).get("files") or [])
            missing = [p for p in wanted if p not in found or not found[p].is_final]
            if missing and submitted_since is not None:
                start = utc_iso(
                    submitted_since - HISTORY_SCAN_SLACK, "milliseconds"
                )  # as loadHistoryScan takes it
                scanned = _call(pipe, manager.get_history_range, start)
                entries += list(scanned.get("files") or [])
            for entry in entries:
                report = PipeFileReport.from_json(entry)
                if report.path in wanted:
                    previous = found.get(report.path)
                    if previous is None or report.last_insert_time >= previous.last_insert_time:
                        found[report.path] = report
            pending = sorted(p for p in wanted if p not in found or not found[p].is_final)
            if not pending:
                return found
            if time.monotonic() >= deadline:
                raise RetryableError(
                    f"Snowpipe did not confirm {len(pending)} file(s) within {self.confirm_timeout_s:g}s "
                    f"(first: {pending[0]}); the message returns to the queue"
                )
            time.sleep(self.poll_interval_s)


def _call(pipe: str, request: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run one SDK request; HTTP 4xx (bad key, unknown pipe) is permanent, the rest retryable."""
    import requests
    from snowflake.ingest.error import IngestClientError, IngestResponseError

    try:
        response: dict[str, Any] = request(*args)
    except IngestResponseError as exc:
        if exc.http_error_code in _PERMANENT_HTTP:
            raise PermanentError(f"Snowpipe refused the request for pipe {pipe}: {exc}") from exc
        raise RetryableError(f"Snowpipe request for pipe {pipe} failed: {exc}") from exc
    except IngestClientError as exc:
        raise PermanentError(f"Snowpipe client error for pipe {pipe}: {exc}") from exc
    except requests.exceptions.RequestException as exc:
        raise RetryableError(f"Snowpipe unreachable for pipe {pipe}: {type(exc).__name__}") from exc
    return response


def private_key_pem(private_key: Any) -> str:
    """The SDK signs with an unencrypted PKCS#8 PEM text."""
    from cryptography.hazmat.primitives import serialization

    return str(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
    )


def snowpipe_client_from_settings(
    settings: SnowflakeSettings,
    snowpipe_host: str | None,
    *,
    secrets_client: SecretsManagerClient | None = None,
    confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S,
) -> SnowpipeClient:
    """A client signing with the private key of the Snowflake secret (as ``pgsnow.snowflake.connection.connect`` reads it)."""
    from pgsnow.snowflake.connection import read_key_pair_secret

    if not settings.secret_arn:
        raise ConfigError(["LOAD_METHOD=snowpipe needs SNOWFLAKE_SECRET_ARN (key-pair auth)"])
    if secrets_client is None:
        import boto3

        secrets_client = boto3.Session().client("secretsmanager")
    secret = read_key_pair_secret(secrets_client, settings.secret_arn)
    account, user = str(secret["account"]), str(secret["user"])
    return SnowpipeClient(
        account=account,
        user=user,
        private_key_pem=private_key_pem(secret["private_key"]),
        endpoint=snowpipe_endpoint(snowpipe_host, account),
        confirm_timeout_s=confirm_timeout_s,
    )
