"""A GET that S3 refuses because the key is missing reads as missing; a real refusal is raised.

S3 answers a GET of a missing key with 403 when the caller may not list the bucket; pgsnow's roles
may list only under an ``s3:prefix`` condition. ``RunStore`` then lists exactly the key's prefix
(``pgsnow.staging.denied_because_missing``). A moto server enforcing IAM makes the 403s for real:
a user may list ``_pgsnow/*`` and ``staging/*`` but read only ``_pgsnow/readable/*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from moto_iam_support import MOTO_LIST_ACTIONS, MOTO_READ_ACTIONS, IamMoto, start_iam_moto

from pgsnow.errors import PgSnowError
from pgsnow.keys import drain_state_key
from pgsnow.runs import RunStore

pytestmark = pytest.mark.integration

BUCKET = "pgsnow-denied-as-missing"


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[IamMoto]:
    server = start_iam_moto()
    try:
        server.client("s3").create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reader_s3(iam_moto: IamMoto) -> Any:
    _, key = iam_moto.create_user(
        "pgsnow-reader",
        [
            {
                "Effect": "Allow",
                "Action": MOTO_LIST_ACTIONS,
                "Resource": f"arn:aws:s3:::{BUCKET}",
                "Condition": {"StringLike": {"s3:prefix": ["_pgsnow/*", "staging/*"]}},
            },
            {
                "Effect": "Allow",
                "Action": MOTO_READ_ACTIONS,
                "Resource": f"arn:aws:s3:::{BUCKET}/_pgsnow/readable/*",
            },
        ],
    )
    return iam_moto.client("s3", key)


def test_a_refused_get_of_a_missing_key_reads_as_missing(iam_moto: IamMoto, reader_s3: Any) -> None:
    store = RunStore(reader_s3, BUCKET)
    key = drain_state_key("never_drained")
    assert key.startswith("_pgsnow/") and not key.startswith("_pgsnow/readable/")
    # the GET itself is refused (403), as S3 refuses a caller that may not list the key
    with pytest.raises(ClientError) as refused:
        reader_s3.get_object(Bucket=BUCKET, Key=key)
    assert refused.value.response["Error"]["Code"] in ("AccessDenied", "403")
    # and the store reads it as missing, as it reads a plain 404
    assert store.load_drain_state("never_drained") is None


def test_a_refused_get_of_an_existing_key_is_raised(iam_moto: IamMoto, reader_s3: Any) -> None:
    key = drain_state_key("drained")
    iam_moto.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    store = RunStore(reader_s3, BUCKET)
    with pytest.raises(PgSnowError, match=re.escape(key)):
        store.load_drain_state("drained")


def test_a_staged_file_not_uploaded_yet_reads_as_missing_to_the_loader(
    iam_moto: IamMoto, reader_s3: Any
) -> None:
    # (the loader's look-up of a change run's files: a file still to come is waited for, not an error)
    from pgsnow.keys import parse_data_key
    from pgsnow.load.objects import head_staged_object

    staged = parse_data_key(
        "staging/public/items/public_items_batch2_20261207T000000000000Z.csv.gz", "staging"
    )
    with pytest.raises(ClientError):  # refused, as S3 may refuse a caller that may not list it
        reader_s3.head_object(Bucket=BUCKET, Key=staged.key)
    assert head_staged_object(reader_s3, BUCKET, staged) is None
