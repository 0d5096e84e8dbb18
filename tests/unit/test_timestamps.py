"""The one way the project writes a moment as text (manifests, sweeper tags, Snowpipe's REST API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pgsnow.timestamps import Precision, utc_iso

pytestmark = pytest.mark.unit

MOMENT = datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "timespec", "text"),
    [
        pytest.param(MOMENT, "microseconds", "2026-01-02T03:04:05.678999Z", id="manifest-microseconds"),
        pytest.param(
            MOMENT, "milliseconds", "2026-01-02T03:04:05.678Z", id="snowpipe-milliseconds-truncated"
        ),
        pytest.param(MOMENT, "seconds", "2026-01-02T03:04:05Z", id="sweeper-seconds"),
        pytest.param(
            datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            "microseconds",
            "2026-01-02T03:04:05.000000Z",
            id="converted-to-utc",
        ),
    ],
)
def test_utc_iso_writes_utc_with_z_to_the_precision_asked(
    moment: datetime, timespec: Precision, text: str
) -> None:
    assert utc_iso(moment, timespec) == text
