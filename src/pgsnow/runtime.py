"""Cached clients for the Lambda handlers: settings, boto3, PostgreSQL and Snowflake connections.

A warm Lambda container reuses them across invocations. Tests build their own
clients pointed at loopback servers and call the core functions directly, or
reset the cache with ``reset_runtime()`` after changing the environment.

Every AWS client of a function comes from its ``Runtime.session``. Deployed, that is the
default ``boto3.Session``, whose credentials are the function role's (from the environment
Lambda sets). The local stack runs all three functions' handlers in one process, so it cannot
give each its role through environment variables; ``use_aws_session`` is the one seam where it
hands a component the session of that component's role (see docs/local-fidelity.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, cast

import boto3

from pgsnow.config import Component, Settings
from pgsnow.errors import PermanentError, RetryableError, aws_error_code
from pgsnow.identifiers import TableRef

if TYPE_CHECKING:  # psycopg2 ships in the extractor's artifact only
    from pgsnow.extract.ranges import FanOut
    from pgsnow.load.batch import Loader
    from pgsnow.postgres import Connection
    from pgsnow.snowflake.load_sql import CredentialsSource

# Continues an extraction run in a new invocation, given the extractor event that continues it.
ContinuationInvoker = Callable[[dict[str, str]], None]

_RETRYABLE_SECRET_ERRORS = frozenset(
    {"ThrottlingException", "InternalServiceError", "InternalServiceErrorException"}
)


def read_secret_json(secrets_client: Any, secret_arn: str) -> dict[str, Any]:
    """Fetch a Secrets Manager secret holding a JSON object.

    A refusal that retrying cannot fix (no such secret, access denied, a deleted or undecryptable
    one) is permanent and names the secret; throttling and a lost connection are retryable."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = secrets_client.get_secret_value(SecretId=secret_arn)
    except ClientError as exc:
        code = aws_error_code(exc)
        message = f"cannot read secret {secret_arn}: {code or 'error'} ({exc.response.get('Error', {}).get('Message', '')})"
        if code in _RETRYABLE_SECRET_ERRORS:
            raise RetryableError(message) from exc
        raise PermanentError(message) from exc
    except BotoCoreError as exc:
        raise RetryableError(f"cannot reach Secrets Manager for secret {secret_arn}: {exc}") from exc
    try:
        value = json.loads(response["SecretString"])
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"secret {secret_arn} does not hold a JSON object") from exc
    if not isinstance(value, dict):
        raise PermanentError(f"secret {secret_arn} does not hold a JSON object")
    return value


def postgres_dsn(settings: Settings, secrets_client: Any | None = None) -> str:
    """The libpq DSN: PGSNOW_PG_DSN locally, else built from the RDS-format secret."""
    if settings.postgres.dsn:
        return settings.postgres.dsn
    if not settings.postgres.secret_arn:
        raise PermanentError("no PostgreSQL connection configured (PGSNOW_PG_SECRET_ARN or PGSNOW_PG_DSN)")
    secret = read_secret_json(
        secrets_client or boto3.Session().client("secretsmanager"), settings.postgres.secret_arn
    )
    missing = [k for k in ("host", "username", "password") if not secret.get(k)]
    if missing:
        raise PermanentError(f"PostgreSQL secret lacks {', '.join(missing)}")
    from psycopg2.extensions import make_dsn

    return str(
        make_dsn(
            host=secret["host"],
            port=str(secret.get("port", 5432)),
            user=secret["username"],
            password=secret["password"],
            dbname=secret.get("dbname") or secret.get("database") or "postgres",
            sslmode=secret.get("sslmode", "require"),
        )
    )


@dataclass
class Runtime:
    """One function's cached settings, AWS clients (all from ``session``) and Snowflake connection."""

    settings: Settings
    session: boto3.Session
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _snowflake: Any = field(default=None, repr=False)
    _snowpipe: Any = field(default=None, repr=False)
    # One PostgreSQL connection per thread: deployed a container runs one invocation at a time;
    # the local stack runs concurrent extractor invocations (range workers) on threads.
    _threads: threading.local = field(default_factory=threading.local, repr=False)
    # Replaced by the local stack and tests: a callable that runs the extractor handler in-process.
    continuation_invoker: ContinuationInvoker | None = field(default=None, repr=False)
    _loader: Any = field(default=None, repr=False)

    def client(self, service: str) -> Any:
        """The cached client of ``service`` made from this function's session."""
        with self._lock:  # the local dispatcher may run one function's handlers on two threads
            if service not in self._clients:
                self._clients[service] = self.session.client(service)  # type: ignore[call-overload]
            return self._clients[service]

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def secretsmanager(self) -> Any:
        return self.client("secretsmanager")

    def snowflake(self) -> Any:
        """One Snowflake connection per container, reopened if it was closed."""
        from pgsnow.snowflake.connection import connect

        if self._snowflake is None or self._snowflake.is_closed():
            self._snowflake = connect(self.settings.snowflake, secrets_client=self._secrets_if_needed())
        return self._snowflake

    def postgres(self) -> Connection:
        """One PostgreSQL connection per container, reopened if it was closed or broken."""
        from pgsnow.postgres import connect

        current: Connection | None = getattr(self._threads, "postgres", None)
        if current is None or current.closed:
            current = connect(
                self.postgres_dsn(), statement_timeout_ms=self.settings.postgres.statement_timeout_ms
            )
            self._threads.postgres = current
        return current

    def send_range_messages(self, bodies: list[dict[str, Any]]) -> None:
        """Send a parallel run's range messages to EXTRACT_RANGE_QUEUE_URL, one SendMessage each
        (IAM knows no SendMessageBatch action; the local moto server checks one by that name). A
        failure is a RetryableError: the run's next invocation sends its unfinished ranges again."""
        from botocore.exceptions import BotoCoreError, ClientError

        queue_url = self.settings.extract.range_queue_url
        if not queue_url:
            raise PermanentError("EXTRACT_RANGE_QUEUE_URL is not set: cannot send a run's ranges")
        for body in bodies:
            try:
                self.sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body, sort_keys=True))
            except (ClientError, BotoCoreError) as exc:
                raise RetryableError(f"cannot send a range message to {queue_url}: {exc}") from exc

    def fan_out(self) -> FanOut | None:
        """What hands large runs to the range workers; None when EXTRACT_MAX_WORKERS is 1 or the
        range queue is not configured (runs stay single-worker)."""
        from pgsnow.extract.ranges import FanOut

        return FanOut(self.send_range_messages) if self.settings.extract.parallel else None

    def invoke_continuation(self, payload: dict[str, str]) -> None:
        """Continue an extraction run in a new invocation of this function: ``lambda:InvokeFunction``
        with InvocationType=Event, or ``continuation_invoker`` where the local stack or a test set one."""
        if self.continuation_invoker is not None:
            self.continuation_invoker(payload)
            return
        function_name = self.settings.extract.function_name
        if not function_name:
            raise PermanentError(
                "AWS_LAMBDA_FUNCTION_NAME is not set: cannot continue the run in a new invocation"
            )
        self.client("lambda").invoke(
            FunctionName=function_name, InvocationType="Event", Payload=json.dumps(payload).encode()
        )

    def snowpipe(self) -> Any:
        """LOAD_METHOD=snowpipe: one Snowpipe REST client per container (its key pair read from the
        Snowflake secret with this function's own Secrets Manager client); None for other methods."""
        from pgsnow.config import LoadMethod
        from pgsnow.snowpipe import snowpipe_client_from_settings

        if self.settings.load.method is not LoadMethod.SNOWPIPE:
            return None
        if self._snowpipe is None:
            self._snowpipe = snowpipe_client_from_settings(
                self.settings.snowflake, self.settings.load.snowpipe_host, secrets_client=self.secretsmanager
            )
        return self._snowpipe

    def loader(self) -> Loader:
        """The loader, built once per container: it remembers the tables it has prepared, so a
        steady batch sends no DDL. Without a storage integration Snowflake reads S3 with the
        credentials of this function's session (the credentials method)."""
        from pgsnow.load.batch import Loader

        if self._loader is None:
            # boto3.Session has get_credentials(); its stubs type the result more narrowly than the Protocol.
            session = cast("CredentialsSource", self.session)
            built = Loader(self.settings, self.s3, credentials_source=session, snowpipe=self.snowpipe())
            with self._lock:  # two threads may build one; both keep the first
                if self._loader is None:
                    self._loader = built
        return cast("Loader", self._loader)

    def postgres_dsn(self) -> str:
        """``postgres_dsn`` with this function's Secrets Manager client."""
        return postgres_dsn(self.settings, self._secrets_if_needed())

    def _secrets_if_needed(self) -> Any:
        # No client (and no credentials lookup) when the settings hold no secret ARN, as locally.
        if self.settings.snowflake.secret_arn or self.settings.postgres.secret_arn:
            return self.secretsmanager
        return None

    def tables_from_event(self, event: dict[str, Any]) -> list[TableRef] | None:
        """A {"schema_name", "table_name"} event narrows the work to one allowlisted table."""
        schema, table = event.get("schema_name"), event.get("table_name")
        if schema is None and table is None:
            return None
        if not isinstance(schema, str) or not isinstance(table, str):
            raise PermanentError("event must carry string schema_name and table_name")
        return [self.settings.tables.check(TableRef(schema, table))]


# Sessions the local stack gave a component (use_aws_session); deployed, this stays empty.
_sessions: dict[Component, boto3.Session] = {}


def use_aws_session(component: Component, session: boto3.Session | None) -> None:
    """Make ``component``'s handler build its AWS clients from ``session`` (None: the default again).

    The local stack's seam: it runs every function in one process, each as its own IAM role,
    so each gets a session with that role's refreshing credentials. Forgets the component's
    cached runtime so the next invocation uses the new session.
    """
    if session is None:
        _sessions.pop(component, None)
    else:
        _sessions[component] = session
    _runtime.cache_clear()


@cache
def _runtime(component: Component) -> Runtime:
    settings = Settings.from_env(component=component)
    # boto3.Session() reads credentials and region from the environment, as Lambda sets them.
    return Runtime(settings=settings, session=_sessions.get(component) or boto3.Session())


def extractor_runtime() -> Runtime:
    return _runtime(Component.EXTRACTOR)


def change_capture_runtime() -> Runtime:
    """The change-capture function's (``ChangeCaptureFunction``: its own role, locally too)."""
    return _runtime(Component.CHANGE_CAPTURE)


def loader_runtime() -> Runtime:
    return _runtime(Component.LOADER)


def cleanup_runtime() -> Runtime:
    return _runtime(Component.CLEANUP)


def reset_runtime() -> None:
    """Forget cached settings and clients (tests that change the environment call this)."""
    _runtime.cache_clear()
