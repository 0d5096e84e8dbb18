"""The ONE place a Snowflake failure is sorted into retryable or permanent, and the redaction
that keeps credentials out of every log line and error message.

Errors are sorted by errno first (transient whatever their sqlstate), then by sqlstate class,
then by the connector's exception type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pgsnow.errors import PermanentError, PgSnowError, RetryableError

_CREDENTIALS_CLAUSE = re.compile(r"CREDENTIALS\s*=\s*\([^)]*\)?", re.IGNORECASE)
_CREDENTIAL_VALUE = re.compile(r"(AWS_(?:KEY_ID|SECRET_KEY|TOKEN)\s*=\s*)'[^']*'?", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_credentials(text: str, secrets: Sequence[str] = ()) -> str:
    """Text safe to log: any CREDENTIALS clause (or a piece of one) and the given secret values
    replaced. Error messages pass through here too, since a server may echo the statement."""
    redacted = _CREDENTIALS_CLAUSE.sub(f"CREDENTIALS = ({REDACTED})", text)
    redacted = _CREDENTIAL_VALUE.sub(rf"\g<1>{REDACTED}", redacted)
    for secret in secrets:
        if secret:
            redacted = redacted.replace(secret, REDACTED)
    return redacted


# Snowflake error numbers (errno) that are transient whatever their sqlstate.
_RETRYABLE_ERRNOS = frozenset(
    {
        604,  # statement cancelled by timeout
        606,  # no active warehouse (suspended / resuming)
        608,  # warehouse cannot be resumed right now
        625,  # a lock wait gave up: too many waiters, or the session's LOCK_TIMEOUT (sqlstate 57014)
        630,  # statement reached its statement or warehouse timeout
        390114,  # authentication token expired: reconnect
        # connector network errors
        250001,
        250002,
        250003,
        250005,
        251011,
        251012,
        252007,
        252010,
        252013,
    }
)
# sqlstate classes / codes that are transient.
_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "57")  # connection, txn conflict, resources, operator
# sqlstate classes that retrying cannot fix.
_PERMANENT_SQLSTATE_CLASSES = ("0A", "21", "22", "23", "42", "28", "02")


def classify_snowflake_error(
    exc: BaseException,
    *,
    table: str | None = None,
    s3_key: str | None = None,
    run_id: str | None = None,
    secrets: Sequence[str] = (),
) -> PgSnowError:
    """The ONE place a Snowflake failure is sorted into retryable or permanent.

    The message never carries credentials: a CREDENTIALS clause the server quoted is redacted,
    and so is each of ``secrets`` (the values the failed statement carried) wherever it appears.
    """
    if isinstance(exc, PgSnowError):
        exc.table = exc.table or table
        exc.s3_key = exc.s3_key or s3_key
        exc.run_id = exc.run_id or run_id
        return exc
    from snowflake.connector import errors as sf_errors

    context: dict[str, Any] = {"table": table, "s3_key": s3_key, "run_id": run_id}
    if not isinstance(exc, sf_errors.Error):
        if isinstance(exc, (OSError, TimeoutError)):
            return RetryableError(
                redact_credentials(f"Snowflake connection failed: {type(exc).__name__}: {exc}", secrets),
                **context,
            )
        return PermanentError(
            redact_credentials(
                f"unexpected error talking to Snowflake: {type(exc).__name__}: {exc}", secrets
            ),
            **context,
        )

    errno = exc.errno
    sqlstate = exc.sqlstate if exc.sqlstate and exc.sqlstate != "n/a" else None
    # The server's message may quote the statement, CREDENTIALS and all.
    message = redact_credentials(f"Snowflake error {errno}: {exc.raw_msg or exc.msg}", secrets)
    context["sqlstate"] = sqlstate
    if errno in _RETRYABLE_ERRNOS:
        return RetryableError(message, **context)
    if sqlstate and sqlstate.startswith(_RETRYABLE_SQLSTATE_CLASSES):
        return RetryableError(message, **context)
    if sqlstate and sqlstate.startswith(_PERMANENT_SQLSTATE_CLASSES):
        return PermanentError(message, **context)
    transient_http = (
        sf_errors.HttpError,
        sf_errors.InternalServerError,
        sf_errors.ServiceUnavailableError,
        sf_errors.GatewayTimeoutError,
        sf_errors.RequestTimeoutError,
        sf_errors.BadGatewayError,
        sf_errors.TooManyRequests,
        sf_errors.OtherHTTPRetryableError,
        sf_errors.RequestExceedMaxRetryError,
        sf_errors.TokenExpiredError,
    )
    if isinstance(exc, (sf_errors.OperationalError, sf_errors.InterfaceError, *transient_http)):
        return RetryableError(message, **context)
    return PermanentError(message, **context)
