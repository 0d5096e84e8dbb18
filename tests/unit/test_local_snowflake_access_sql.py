"""Storage integrations, credentials and user keys as text: the local Snowflake's parsers."""

from __future__ import annotations

import pytest

from pgsnow.local.sf_access_sql import (
    AlterStorageIntegration,
    location_allowed,
    parse_alter_storage_integration,
    parse_alter_user_public_key,
    parse_create_storage_integration,
    parse_describe_integration,
)
from pgsnow.local.sf_copy_sql import CopySyntaxError, UrlSource, parse_copy
from pgsnow.local.sf_credentials_sql import AccessSyntaxError, AwsCredentials, split_credentials
from pgsnow.setup_sql import SetupOptions, build_setup_steps

pytestmark = pytest.mark.unit


def test_setup_sql_storage_integration_parses() -> None:
    options = SetupOptions(
        database="DB", schema="PGSNOW", role="R", bucket="bkt", aws_role_arn="arn:aws:iam::1:role/r"
    )
    create = next(
        s
        for step in build_setup_steps(options)
        for s in step.statements
        if s.startswith("CREATE STORAGE INTEGRATION")
    )

    parsed = parse_create_storage_integration(create)

    assert parsed is not None
    assert (parsed.name, parsed.if_not_exists, parsed.replace, parsed.enabled) == (
        "PGSNOW_S3",
        True,
        False,
        True,
    )
    assert parsed.role_arn == "arn:aws:iam::1:role/r"
    assert parsed.allowed_locations == ("s3://bkt/staging/", "s3://bkt/_pgsnow/keys/")
    assert (parsed.blocked_locations, parsed.external_id) == ((), None)


def test_storage_integration_with_every_option() -> None:
    parsed = parse_create_storage_integration(
        "CREATE OR REPLACE STORAGE INTEGRATION \"Mixed\" TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' "
        "ENABLED = FALSE STORAGE_AWS_ROLE_ARN = 'arn:r' STORAGE_AWS_EXTERNAL_ID = 'ext' "
        "STORAGE_ALLOWED_LOCATIONS = ('s3://a/x/', 's3://b/') STORAGE_BLOCKED_LOCATIONS = ('s3://a/x/no/') "
        "COMMENT = 'c'"
    )

    assert parsed is not None
    assert (parsed.name, parsed.replace, parsed.enabled, parsed.external_id) == ("Mixed", True, False, "ext")
    assert parsed.allowed_locations == ("s3://a/x/", "s3://b/")
    assert parsed.blocked_locations == ("s3://a/x/no/",)
    assert parsed.comment == "c"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        pytest.param(
            "CREATE STORAGE INTEGRATION i TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'GCS' ENABLED = TRUE "
            "STORAGE_ALLOWED_LOCATIONS = ('gcs://b/')",
            "STORAGE_PROVIDER = 'S3'",
            id="other-provider",
        ),
        pytest.param(
            "CREATE STORAGE INTEGRATION i TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
            "STORAGE_ALLOWED_LOCATIONS = ('s3://b/')",
            "STORAGE_AWS_ROLE_ARN",
            id="no-role",
        ),
        pytest.param(
            "CREATE STORAGE INTEGRATION i TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
            "STORAGE_AWS_ROLE_ARN = 'arn:r'",
            "STORAGE_ALLOWED_LOCATIONS",
            id="no-locations",
        ),
        pytest.param(
            "CREATE STORAGE INTEGRATION i TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE "
            "STORAGE_AWS_ROLE_ARN = 'arn:r' STORAGE_ALLOWED_LOCATIONS = ('s3://b/') STORAGE_AWS_OBJECT_ACL = 'x'",
            "STORAGE_AWS_OBJECT_ACL",
            id="unknown-property",
        ),
    ],
)
def test_storage_integration_it_cannot_enforce_is_refused(sql: str, message: str) -> None:
    with pytest.raises(AccessSyntaxError, match=message):
        parse_create_storage_integration(sql)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param("DESC INTEGRATION pgsnow_s3", "PGSNOW_S3", id="desc"),
        pytest.param('DESCRIBE STORAGE INTEGRATION "Mixed"', "Mixed", id="describe-quoted"),
        pytest.param("DESC TABLE t", None, id="other-object"),
        pytest.param("CREATE STAGE s URL = 's3://b/'", None, id="other-statement"),
    ],
)
def test_describe_integration(sql: str, expected: str | None) -> None:
    assert parse_describe_integration(sql) == expected


@pytest.mark.parametrize(
    ("sql", "user", "key"),
    [
        pytest.param(
            "ALTER USER pgsnow_loader SET RSA_PUBLIC_KEY = 'MIIB'", "PGSNOW_LOADER", "MIIB", id="plain"
        ),
        pytest.param(
            "ALTER USER IF EXISTS \"Loader\" SET RSA_PUBLIC_KEY='MI IB';", "Loader", "MI IB", id="quoted"
        ),
    ],
)
def test_alter_user_public_key(sql: str, user: str, key: str) -> None:
    parsed = parse_alter_user_public_key(sql)

    assert parsed is not None
    assert (parsed.user, parsed.public_key) == (user, key)


def test_other_alter_user_is_not_ours() -> None:
    assert parse_alter_user_public_key("ALTER USER u SET DEFAULT_ROLE = r") is None


@pytest.mark.parametrize(
    ("url", "allowed", "blocked", "expected"),
    [
        pytest.param("s3://b/p/", ("s3://b/p/",), (), True, id="exact"),
        pytest.param("s3://b/p/x/y.csv", ("s3://b/p/",), (), True, id="below"),
        pytest.param("s3://b/p", ("s3://b/p/",), (), True, id="url-without-slash"),
        pytest.param("s3://b/px/y.csv", ("s3://b/p/",), (), False, id="sibling-with-same-start"),
        pytest.param("s3://b/px/y.csv", ("s3://b/p",), (), False, id="allowed-without-slash"),
        pytest.param("s3://other/p/", ("s3://b/p/",), (), False, id="other-bucket"),
        pytest.param("s3://any/where/", ("*",), (), True, id="star"),
        pytest.param("s3://b/p/no/f.csv", ("s3://b/",), ("s3://b/p/no/",), False, id="blocked"),
        pytest.param("s3://b/p/yes/f.csv", ("s3://b/",), ("s3://b/p/no/",), True, id="beside-blocked"),
    ],
)
def test_location_allowed(
    url: str, allowed: tuple[str, ...], blocked: tuple[str, ...], expected: bool
) -> None:
    assert location_allowed(url, allowed, blocked) is expected


def test_credentials_clause_is_split_off_and_kept_secret() -> None:
    sql = (
        "COPY INTO t FROM 's3://b/p/' FILES = ('a') "
        "CREDENTIALS = (AWS_KEY_ID = 'k' AWS_SECRET_KEY = 's''q)' AWS_TOKEN = 't') FILE_FORMAT = (TYPE = CSV)"
    )

    remaining, credentials = split_credentials(sql)

    assert credentials == AwsCredentials("k", "s'q)", "t")
    assert "CREDENTIALS" not in remaining and "FILE_FORMAT = (TYPE = CSV)" in remaining
    assert repr(credentials) == "AwsCredentials(key_id='k')"


@pytest.mark.parametrize(
    "clause",
    [
        pytest.param("CREDENTIALS = (AWS_KEY_ID = 'k')", id="no-secret"),
        pytest.param("CREDENTIALS = (AWS_ROLE = 'arn:r')", id="role"),
    ],
)
def test_credentials_it_cannot_use_are_refused(clause: str) -> None:
    with pytest.raises(AccessSyntaxError):
        split_credentials(f"COPY INTO t FROM 's3://b/' {clause}")


@pytest.mark.parametrize(
    ("auth", "integration", "credentials"),
    [
        pytest.param("STORAGE_INTEGRATION = si", "SI", None, id="integration-after-source"),
        pytest.param("FILES = ('a') STORAGE_INTEGRATION = \"Si\"", "Si", None, id="integration-after-files"),
        pytest.param(
            "FILES = ('a') CREDENTIALS = (AWS_KEY_ID = 'k' AWS_SECRET_KEY = 's')",
            None,
            AwsCredentials("k", "s"),
            id="credentials",
        ),
        pytest.param("FILES = ('a')", None, None, id="neither"),
    ],
)
def test_copy_from_url_keeps_how_it_authenticates(
    auth: str, integration: str | None, credentials: AwsCredentials | None
) -> None:
    statement = parse_copy(f"COPY INTO t FROM 's3://b/p/' {auth} FILE_FORMAT = (TYPE = CSV)")

    assert statement is not None
    assert statement.source == UrlSource("s3://b/p/")
    assert (statement.storage_integration, statement.credentials) == (integration, credentials)


def test_copy_with_unusable_credentials_is_a_syntax_error() -> None:
    with pytest.raises(CopySyntaxError, match="AWS_SECRET_KEY"):
        parse_copy("COPY INTO t FROM 's3://b/p/' CREDENTIALS = (AWS_KEY_ID = 'k') FILE_FORMAT = (TYPE = CSV)")


def test_setup_sql_alter_storage_integration_parses() -> None:
    options = SetupOptions(
        database="DB", schema="PGSNOW", role="R", bucket="bkt", aws_role_arn="arn:aws:iam::1:role/r"
    )
    alter = next(
        s
        for step in build_setup_steps(options)
        for s in step.statements
        if s.startswith("ALTER STORAGE INTEGRATION")
    )

    assert parse_alter_storage_integration(alter) == AlterStorageIntegration(
        name="PGSNOW_S3",
        if_exists=False,
        allowed_locations=("s3://bkt/staging/", "s3://bkt/_pgsnow/keys/"),
    )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            "alter integration if exists si set enabled = false",
            AlterStorageIntegration("SI", True, enabled=False),
            id="integration-without-storage-keyword",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION \"Mixed\" SET STORAGE_AWS_ROLE_ARN = 'arn:aws:iam::1:role/n', "
            "STORAGE_AWS_EXTERNAL_ID = 'ext'\n  COMMENT = 'it''s'",
            AlterStorageIntegration(
                "Mixed", False, role_arn="arn:aws:iam::1:role/n", external_id="ext", comment="it's"
            ),
            id="commas-newlines-quoted-name",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_BLOCKED_LOCATIONS = () ENABLED = TRUE;",
            AlterStorageIntegration("SI", False, enabled=True, blocked_locations=()),
            id="empty-blocked-list",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_ALLOWED_LOCATIONS = ('*')",
            AlterStorageIntegration("SI", False, allowed_locations=("*",)),
            id="allow-all",
        ),
        pytest.param("ALTER USER u SET RSA_PUBLIC_KEY = 'k'", None, id="not-an-integration"),
        pytest.param("ALTER SESSION SET QUERY_TAG = 'x'", None, id="a-session"),
    ],
)
def test_alter_storage_integration(sql: str, expected: AlterStorageIntegration | None) -> None:
    assert parse_alter_storage_integration(sql) == expected


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_AWS_OBJECT_ACL = 'bucket-owner-full-control'",
            "STORAGE_AWS_OBJECT_ACL is not supported",
            id="object-acl",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET AZURE_TENANT_ID = 't'",
            "AZURE_TENANT_ID is not supported",
            id="azure",
        ),
        pytest.param("ALTER STORAGE INTEGRATION si UNSET COMMENT", "UNSET is not supported", id="unset"),
        pytest.param("ALTER STORAGE INTEGRATION si SET TAG t = 'v'", "SET TAG is not supported", id="tag"),
        pytest.param("ALTER STORAGE INTEGRATION si SET ENABLED = MAYBE", "TRUE or FALSE", id="enabled-word"),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_ALLOWED_LOCATIONS = ('gcs://b/')",
            "not an s3:// URL",
            id="another-cloud",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_ALLOWED_LOCATIONS = ()",
            "at least one",
            id="no-locations",
        ),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET STORAGE_ALLOWED_LOCATIONS = 's3://b/'", "list", id="not-a-list"
        ),
        pytest.param("ALTER STORAGE INTEGRATION si SET", "at least one property", id="nothing-set"),
        pytest.param(
            "ALTER STORAGE INTEGRATION si SET COMMENT = 'a' COMMENT = 'b'", "given twice", id="repeated"
        ),
    ],
)
def test_alter_storage_integration_refuses_what_it_cannot_apply(sql: str, message: str) -> None:
    with pytest.raises(AccessSyntaxError, match=message):
        parse_alter_storage_integration(sql)
