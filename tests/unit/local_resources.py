"""The staging resources the unit tests resolve the template against: what a local stack creates
(``pgsnow.local.aws.create_staging_resources``), with fixed names and the non-default prefix ``landing``."""

from __future__ import annotations

from pgsnow.local.aws import StagingResources

RESOURCES = StagingResources(
    bucket="pgsnow-local-bucket",
    queue_url="http://127.0.0.1:5000/123456789012/pgsnow-local-bucket-loader",
    queue_arn="arn:aws:sqs:us-east-1:123456789012:pgsnow-local-bucket-loader",
    dlq_url="http://127.0.0.1:5000/123456789012/pgsnow-local-bucket-loader-dlq",
    dlq_arn="arn:aws:sqs:us-east-1:123456789012:pgsnow-local-bucket-loader-dlq",
    prefix="landing",
    range_queue_url="http://127.0.0.1:5000/123456789012/pgsnow-local-bucket-ranges",
    range_queue_arn="arn:aws:sqs:us-east-1:123456789012:pgsnow-local-bucket-ranges",
    range_dlq_url="http://127.0.0.1:5000/123456789012/pgsnow-local-bucket-ranges-dlq",
    range_dlq_arn="arn:aws:sqs:us-east-1:123456789012:pgsnow-local-bucket-ranges-dlq",
)
