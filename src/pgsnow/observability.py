"""Structured JSON logs and EMF metrics (AWS Lambda Powertools), created once per process.

Log keys used across the project: run_id, table, s3_key, rows, bytes, duration_ms.
Never log secrets, DSNs or row contents.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "pgsnow")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "pgsnow")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
