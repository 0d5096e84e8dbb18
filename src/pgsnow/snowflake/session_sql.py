"""The statements that set up a pgsnow Snowflake session once, when ``connection.connect`` opens it.

Pure functions: each statement is read and unit-tested as text (tests/unit/test_snowflake_sql.py).
ALTER SESSION takes no bind variables; its values here are integers we computed.
"""

from __future__ import annotations

from pgsnow.config import SnowflakeSettings
from pgsnow.errors import PermanentError


def build_set_lock_timeout(seconds: int) -> str:
    """How long a statement of the session waits for a lock before Snowflake aborts it
    (``LOCK_TIMEOUT``, a session parameter in seconds: 0 would not wait at all)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise PermanentError(f"LOCK_TIMEOUT must be a whole number of seconds >= 1, got {seconds!r}")
    return f"ALTER SESSION SET LOCK_TIMEOUT = {seconds}"


def session_setup_sql(settings: SnowflakeSettings) -> list[str]:
    """What a session of these settings runs once, right after login: its LOCK_TIMEOUT when it
    belongs to a function (``SnowflakeSettings.lock_timeout_s``), nothing otherwise."""
    if settings.lock_timeout_s is None:
        return []
    return [build_set_lock_timeout(settings.lock_timeout_s)]
