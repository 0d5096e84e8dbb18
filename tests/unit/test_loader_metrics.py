"""The loader handler's per-file metrics, as CloudWatch receives them (EMF lines on stdout)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, new_run_id, parse_data_key
from pgsnow.load.outcomes import FileOutcome, LoadResult, LoadStatus
from pgsnow.local.stack import load_function_handler

pytestmark = pytest.mark.unit

ORDERS = TableRef("public", "orders")


def loaded(key: str, run_id: str | None) -> FileOutcome:
    staged = parse_data_key(key, "staging")
    return FileOutcome(staged, LoadResult(key, ORDERS.qualified, LoadStatus.LOADED, 10, 5, run_id))


def emitted(capsys: pytest.CaptureFixture[str], outcome: FileOutcome) -> dict[str, dict[str, Any]]:
    load_function_handler("loader")
    sys.modules["pgsnow_function_loader_app"].record_outcome_metrics(outcome)
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {d["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"]: d for d in documents}


@pytest.fixture(autouse=True)
def metrics_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)


def test_a_loaded_file_of_a_run_reports_how_old_its_rows_are(capsys: pytest.CaptureFixture[str]) -> None:
    run_id = new_run_id(datetime.now(UTC) - timedelta(minutes=5))
    key = data_key("staging", ORDERS, 1, run_id, FileFormat.CSV)

    metrics = emitted(capsys, loaded(key, run_id))

    lag = metrics["ReplicationLag"]
    assert lag["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Seconds"
    assert 300 <= lag["ReplicationLag"][0] < 600  # the run read its rows five minutes ago
    assert lag["table"] == ORDERS.qualified
    assert {"FilesLoaded", "RowsLoaded", "CopyDuration"} <= set(metrics)


def test_a_hand_dropped_file_has_no_run_so_no_lag(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = emitted(capsys, loaded("staging/public/orders/my_export.csv.gz", None))

    assert "ReplicationLag" not in metrics
    assert "FilesLoaded" in metrics
