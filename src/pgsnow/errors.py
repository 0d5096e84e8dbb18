"""One error hierarchy for the whole project.

Every failure is either *retryable* (the message goes back to the queue, the
invocation is retried) or *permanent* (retrying cannot help: after the queue's
maxReceiveCount the message lands in the dead-letter queue with a report).
`ConfigError` is permanent and carries every configuration problem at once.
Errors carry the context an operator needs (table, key, run, sqlstate) as
attributes so structured logs can show them without parsing the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from botocore.exceptions import ClientError


class PgSnowError(Exception):
    """Base of every error pgsnow raises on purpose."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        s3_key: str | None = None,
        run_id: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.table = table
        self.s3_key = s3_key
        self.run_id = run_id
        self.sqlstate = sqlstate

    def context(self) -> dict[str, Any]:
        """The structured fields worth logging next to the message."""
        fields = {
            "error": type(self).__name__,
            "retryable": self.retryable,
            "table": self.table,
            "s3_key": self.s3_key,
            "run_id": self.run_id,
            "sqlstate": self.sqlstate,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.context().items() if k in {"table", "s3_key", "run_id"})
        return f"{self.message} ({where})" if where else self.message


class RetryableError(PgSnowError):
    """A transient failure: the same work may succeed if tried again later."""

    retryable = True


class PermanentError(PgSnowError):
    """Retrying cannot help: bad input, bad file, permission, incompatible schema."""


class ConfigError(PermanentError):
    """Configuration is invalid. Lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class UnsafeIdentifierError(PermanentError):
    """A schema/table name from an event or key is not allowed (not in the allowlist, or malformed)."""


class VerifyError(PermanentError):
    """``pgsnow verify`` cannot compare a table: the comparison did not run (not a difference)."""


def aws_error_code(exc: ClientError) -> str:
    """The error code of a failed AWS call (``NoSuchKey``, ``PreconditionFailed``, ...); '' if none."""
    return str(exc.response.get("Error", {}).get("Code", "") or "")
