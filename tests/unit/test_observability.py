"""The one helper every per-table metric goes through."""

from __future__ import annotations

import json

import pytest

from pgsnow.observability import record_table_metric

pytestmark = pytest.mark.unit


def test_a_table_metric_is_one_emf_line_with_the_table_dimension(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)

    record_table_metric("RowsLoaded", "public.orders", 42)

    (line,) = capsys.readouterr().out.splitlines()
    document = json.loads(line)
    assert document["RowsLoaded"] == [42.0]
    assert document["table"] == "public.orders"
    assert ["table"] in document["_aws"]["CloudWatchMetrics"][0]["Dimensions"]


def test_disabled_metrics_print_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The local stack sets this: a command's standard output is its report, not CloudWatch's JSON.
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")

    record_table_metric("RowsLoaded", "public.orders", 42)

    assert capsys.readouterr().out == ""


def test_an_invocation_total_has_no_table_dimension_and_the_service_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The template sets POWERTOOLS_SERVICE_NAME: every metric carries it as a dimension.
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "pgsnow-test")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)

    record_table_metric("FilesDeleted", None, 3)
    record_table_metric("RowsExtracted", "public.orders", 7)

    total, per_table = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert total["FilesDeleted"] == [3.0] and "table" not in total
    assert total["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service"]]
    assert total["service"] == "pgsnow-test"
    assert per_table["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["table", "service"]]
