"""Moments as the text the project writes them in: ISO-8601 in UTC with a ``Z``.

Each caller names its precision: manifests keep microseconds, Snowpipe's REST API takes
milliseconds, the sweeper's object tags and reports whole seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

Precision = Literal["seconds", "milliseconds", "microseconds"]


def utc_iso(moment: datetime, timespec: Precision = "microseconds") -> str:
    """``moment`` in UTC as ``2026-01-01T00:00:00.000000Z`` (to ``timespec``, truncated)."""
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
