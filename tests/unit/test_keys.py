"""The ``_pgsnow/`` control keys, exactly as deployed buckets hold them (changing one strands old runs)."""

from __future__ import annotations

import pytest

from pgsnow.identifiers import TableRef
from pgsnow.keys import (
    checkpoint_key,
    key_list_key,
    lease_key,
    manifest_key,
    manifests_prefix,
    orphan_report_key,
    published_columns_key,
    state_prefix,
    watermark_key,
)

pytestmark = pytest.mark.unit

TABLE = TableRef("public", "Order Details")
RUN = "20261125T120000000000Z"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(
            manifest_key(TABLE, RUN), f"_pgsnow/manifests/public/Order Details/{RUN}.json", id="manifest"
        ),
        pytest.param(
            manifests_prefix(TABLE), "_pgsnow/manifests/public/Order Details/", id="manifests-prefix"
        ),
        pytest.param(state_prefix(TABLE), "_pgsnow/state/public/Order Details/", id="state-prefix"),
        pytest.param(lease_key(TABLE), "_pgsnow/state/public/Order Details/lease.json", id="lease"),
        pytest.param(
            checkpoint_key(TABLE, RUN), f"_pgsnow/state/public/Order Details/runs/{RUN}.json", id="checkpoint"
        ),
        pytest.param(
            watermark_key(TABLE), "_pgsnow/state/public/Order Details/watermark.json", id="watermark"
        ),
        pytest.param(
            published_columns_key(TABLE),
            "_pgsnow/state/public/Order Details/columns.json",
            id="published-columns",
        ),
        pytest.param(
            key_list_key(TABLE, RUN), f"_pgsnow/keys/public/Order Details/{RUN}.csv.gz", id="key-list"
        ),
        pytest.param(orphan_report_key(RUN), f"_pgsnow/reports/orphans/{RUN}.json", id="orphan-report"),
    ],
)
def test_control_key_layout(key: str, expected: str) -> None:
    assert key == expected
