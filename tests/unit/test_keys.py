"""The ``_pgsnow/`` control keys, exactly as deployed buckets hold them (changing one strands old runs)."""

from __future__ import annotations

import pytest

from pgsnow.identifiers import TableRef
from pgsnow.keys import (
    PENDING_INDEX_KEY,
    PENDING_PREFIX,
    checkpoint_key,
    key_list_key,
    lease_key,
    manifest_key,
    manifests_prefix,
    orphan_report_key,
    parse_pending_key,
    pending_key,
    pending_prefix,
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
        pytest.param(
            pending_key(TABLE, RUN), f"_pgsnow/pending/public/Order Details/{RUN}", id="pending-run"
        ),
        pytest.param(pending_prefix(TABLE), "_pgsnow/pending/public/Order Details/", id="pending-prefix"),
        pytest.param(PENDING_PREFIX, "_pgsnow/pending/", id="pending-index"),
        pytest.param(PENDING_INDEX_KEY, "_pgsnow/pending-index.json", id="pending-index-record"),
    ],
)
def test_control_key_layout(key: str, expected: str) -> None:
    assert key == expected


def test_pending_key_parses_back() -> None:
    assert parse_pending_key(pending_key(TABLE, RUN)) == (TABLE, RUN)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(PENDING_INDEX_KEY, id="the-index-record"),
        pytest.param(f"_pgsnow/pending/public/{RUN}", id="no-table"),
        pytest.param("_pgsnow/pending/public/orders/not-a-run", id="not-a-run-id"),
        pytest.param(f"_pgsnow/pending/public/orders/x/{RUN}", id="too-deep"),
        pytest.param(f"_pgsnow/pending/./orders/{RUN}", id="unsafe-schema"),
        pytest.param(manifest_key(TABLE, RUN), id="a-manifest"),
    ],
)
def test_other_keys_are_not_pending_markers(key: str) -> None:
    assert parse_pending_key(key) is None
