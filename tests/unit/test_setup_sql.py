"""pgsnow snowflake-sql: the setup statements as text, in run order, and the CLI that prints them."""

from __future__ import annotations

import re

import pytest

from pgsnow.cli import main
from pgsnow.config import LoadMethod
from pgsnow.errors import ConfigError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, key_list_key
from pgsnow.setup_sql import SetupOptions, build_setup_steps, render_setup_sql
from pgsnow.snowflake.load_sql import build_create_stage

pytestmark = pytest.mark.unit

BUCKET = "pgsnow-snowflake-stage-dev-4f9d2c1a"
ROLE_ARN = "arn:aws:iam::123456789012:role/pgsnow-dev-snowflake-us-east-1"
RUN = "20260101T000000000000Z"


def options(**overrides: object) -> SetupOptions:
    base: dict[str, object] = {
        "database": "PGSNOW_DEV",
        "schema": "PGSNOW",
        "role": "PGSNOW_LOADER",
        "bucket": BUCKET,
        "prefix": "staging",
        "aws_role_arn": ROLE_ARN,
    }
    return SetupOptions(**{**base, **overrides})  # type: ignore[arg-type]


def statements(setup: SetupOptions) -> list[str]:
    return [s for step in build_setup_steps(setup) for s in step.statements]


def first_index(all_statements: list[str], pattern: str) -> int:
    return next(i for i, s in enumerate(all_statements) if re.search(pattern, s))


def test_statements_come_in_run_order() -> None:
    # Given the copy-mode setup
    ordered = statements(options())
    # When each kind of statement is located
    positions = [
        first_index(ordered, pattern)
        for pattern in (
            r"^CREATE STORAGE INTEGRATION",
            r"^DESC INTEGRATION",
            r"^CREATE SCHEMA",
            r"^CREATE STAGE",
            r"^CREATE FILE FORMAT",
            r"^CREATE ROLE",
            r"^GRANT USAGE ON WAREHOUSE",
            r"^CREATE USER",
            r"^GRANT ROLE",
        )
    ]
    # Then they appear in exactly that order
    assert positions == sorted(positions)


def test_integration_is_narrowed_to_the_staging_prefix_and_the_key_lists() -> None:
    (integration,) = [s for s in statements(options()) if s.startswith("CREATE STORAGE INTEGRATION")]
    (upgrade,) = [s for s in statements(options()) if s.startswith("ALTER STORAGE INTEGRATION")]
    locations = f"STORAGE_ALLOWED_LOCATIONS = ('s3://{BUCKET}/staging/', 's3://{BUCKET}/_pgsnow/keys/')"
    assert f"STORAGE_AWS_ROLE_ARN = '{ROLE_ARN}'" in integration
    assert locations in integration
    assert upgrade == f'ALTER STORAGE INTEGRATION "PGSNOW_S3" SET {locations}'
    assert "STORAGE_PROVIDER = 'S3'" in integration


def allowed_locations_in(sql: str) -> list[str]:
    (listed,) = re.findall(r"STORAGE_ALLOWED_LOCATIONS = \(([^)]*)\)", sql)
    return re.findall(r"'([^']*)'", listed)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(key_list_key(TableRef("public", "Order Details"), RUN), id="deletes-key-list"),
        pytest.param(
            data_key("staging", TableRef("public", "orders"), 1, RUN, FileFormat.CSV), id="data-file"
        ),
    ],
)
def test_every_object_the_loader_copies_is_inside_an_allowed_location(key: str) -> None:
    """The key list is COPYed by its s3:// URL (outside the stage): the integration must allow it."""
    (integration,) = [s for s in statements(options()) if s.startswith("CREATE STORAGE INTEGRATION")]
    url = f"s3://{BUCKET}/{key}"
    assert any(url.startswith(location) for location in allowed_locations_in(integration))


def test_desc_integration_step_names_both_template_parameters() -> None:
    (step,) = [s for s in build_setup_steps(options()) if s.statements == ('DESC INTEGRATION "PGSNOW_S3"',)]
    assert "SnowflakeIamUserArn" in step.note
    assert "SnowflakeExternalId" in step.note


def test_stage_is_the_loaders_own_sql_and_the_loader_makes_the_ledgers() -> None:
    all_statements = statements(options())
    assert (
        build_create_stage(
            "PGSNOW_DEV",
            "PGSNOW",
            "PGSNOW_STAGE",
            bucket=BUCKET,
            prefix="staging",
            storage_integration="PGSNOW_S3",
        )
        in all_statements
    )
    # The loader creates each table's ledger itself (pgsnow.ledger): the setup creates none.
    assert not any("LOAD_LEDGER" in statement for statement in all_statements)


@pytest.mark.parametrize(
    ("load_method", "tables", "pipes"),
    [
        pytest.param(LoadMethod.COPY, (), [], id="copy-no-pipes"),
        pytest.param(
            LoadMethod.SNOWPIPE,
            (TableRef("public", "orders"), TableRef("Sales", "Line Items")),
            [
                '"PGSNOW_DEV"."PGSNOW"."PGSNOW_PIPE_PUBLIC_ORDERS"',
                '"PGSNOW_DEV"."PGSNOW"."PGSNOW_PIPE_Sales_Line Items"',
            ],
            id="snowpipe-one-pipe-per-table",
        ),
    ],
)
def test_pipes_only_in_snowpipe_mode(
    load_method: LoadMethod, tables: tuple[TableRef, ...], pipes: list[str]
) -> None:
    all_statements = statements(options(load_method=load_method, pipe_tables=tables))
    created = [re.match(r"CREATE PIPE IF NOT EXISTS (.*) AUTO_INGEST", s) for s in all_statements]
    assert [m.group(1) for m in created if m] == pipes
    granted = [s for s in all_statements if s.startswith("GRANT OPERATE, MONITOR ON PIPE")]
    assert len(granted) == len(pipes)
    may_create_pipes = any(s.startswith("GRANT CREATE PIPE ON SCHEMA") for s in all_statements)
    assert may_create_pipes is (load_method is LoadMethod.SNOWPIPE)
    for statement in all_statements:
        if statement.startswith("CREATE PIPE"):
            assert "FILES = " not in statement and "FORCE" not in statement
            assert '@"PGSNOW_DEV"."PGSNOW"."PGSNOW_STAGE"/' in statement


def test_snowpipe_without_tables_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="one pipe per table"):
        build_setup_steps(options(load_method=LoadMethod.SNOWPIPE))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param("role", 'weird"role', '"weird""role"', id="role-quote-doubled"),
        pytest.param("database", "my db", '"my db"', id="database-space"),
        pytest.param("user", "svc", '"svc"', id="user"),
    ],
)
def test_identifiers_are_quoted(field: str, value: str, expected: str) -> None:
    text = render_setup_sql(build_setup_steps(options(**{field: value})))
    assert expected in text


def test_no_private_key_is_ever_printed() -> None:
    (user,) = [s for s in statements(options()) if s.startswith("CREATE USER")]
    assert "RSA_PUBLIC_KEY = '<" in user
    text = render_setup_sql(build_setup_steps(options()))
    assert "-----BEGIN" not in text
    assert "RSA_PRIVATE" not in text


def test_cli_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the command line a user runs after the first deploy
    exit_code = main(
        [
            "snowflake-sql",
            "--database", "PGSNOW_DEV",
            "--schema", "PGSNOW",
            "--role", "PGSNOW_LOADER",
            "--bucket", BUCKET,
            "--prefix", "staging",
            "--integration", "PGSNOW_DEV_S3",
            "--user", "PGSNOW_SVC",
            "--warehouse", "LOAD_WH",
            "--load-method", "snowpipe",
            "--tables", "public.orders",
        ]
    )  # fmt: skip
    # Then it prints every step, numbered, each statement terminated
    out = capsys.readouterr().out
    assert exit_code == 0
    assert re.findall(r"^-- (\d+)\. ", out, flags=re.MULTILINE) == [str(n) for n in range(1, 10)]
    assert 'CREATE STORAGE INTEGRATION IF NOT EXISTS "PGSNOW_DEV_S3"' in out
    assert 'CREATE PIPE IF NOT EXISTS "PGSNOW_DEV"."PGSNOW"."PGSNOW_PIPE_PUBLIC_ORDERS"' in out
    assert 'GRANT ROLE "PGSNOW_LOADER" TO USER "PGSNOW_SVC";' in out
    assert 'GRANT USAGE ON WAREHOUSE "LOAD_WH"' in out
    # verify's temporary canonical-JSON UDF lives in the control schema
    assert 'GRANT USAGE, CREATE TABLE, CREATE FUNCTION ON SCHEMA "PGSNOW_DEV"."PGSNOW"' in out
    body = [line for line in out.splitlines() if line and not line.startswith("--")]
    statement_ends = [line for line in body if line.endswith(";")]
    assert len(statement_ends) == sum(1 for line in body if re.match(r"^(CREATE|ALTER|DESC|GRANT)", line))


def test_credentials_method_prints_no_integration_and_lets_the_loader_create_its_temporary_stage() -> None:
    # Given no integration (the credentials method)
    printed = statements(options(integration=""))
    # Then nothing names an integration or a permanent stage, and the loader may create stages
    assert not [s for s in printed if "INTEGRATION" in s or s.startswith("CREATE STAGE")]
    assert 'GRANT CREATE STAGE ON SCHEMA "PGSNOW_DEV"."PGSNOW" TO ROLE "PGSNOW_LOADER"' in printed
    assert not [s for s in statements(options()) if s.startswith("GRANT CREATE STAGE")]


def test_snowpipe_needs_an_integration() -> None:
    with pytest.raises(ConfigError) as caught:
        build_setup_steps(
            options(integration="", load_method=LoadMethod.SNOWPIPE, pipe_tables=(TableRef("public", "o"),))
        )
    assert "--load-method snowpipe needs --integration" in "; ".join(caught.value.problems)
