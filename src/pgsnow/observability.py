"""Structured JSON logs and EMF metrics (AWS Lambda Powertools), created once per process.

Log keys used across the project: run_id, table, s3_key, rows, bytes, duration_ms.
Never log secrets, DSNs or row contents.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "pgsnow")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "pgsnow")

logger = Logger(service=SERVICE)


def record_table_metric(
    name: str, table: str | None, value: float, unit: MetricUnit = MetricUnit.Count
) -> None:
    """One metric with the table as its dimension (one invocation may touch several tables); with
    ``table`` None, an invocation's total, without one. Every metric of every function goes through
    here. Powertools adds the ``service`` dimension (POWERTOOLS_SERVICE_NAME, set by the template).

    Powertools' ``single_metric`` prints its EMF line even when ``POWERTOOLS_METRICS_DISABLED`` is
    set (only ``Metrics`` flushes honour it); this helper honours it, so a local run's standard
    output carries the report, not CloudWatch's JSON."""
    if is_metrics_disabled():
        return
    with single_metric(name=name, unit=unit, value=value, namespace=NAMESPACE) as metric:
        if table is not None:
            metric.add_dimension(name="table", value=table)
