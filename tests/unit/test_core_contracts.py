"""The contracts every component shares: config, identifiers, keys, manifest, type map."""

from __future__ import annotations

import pytest

from pgsnow.config import CleanupMode, Component, Settings, StagedFormat
from pgsnow.errors import ConfigError, PermanentError, RetryableError, UnsafeIdentifierError
from pgsnow.identifiers import TableAllowlist, TableRef, check_no_collisions, quote_ident, snowflake_name
from pgsnow.keys import (
    FileFormat,
    data_key,
    decode_event_key,
    manifest_key,
    new_run_id,
    parse_data_key,
)
from pgsnow.manifest import Column, RunManifest, RunState, StagedFile
from pgsnow.typemap import ValueKind, map_pg_type

pytestmark = pytest.mark.unit

BASE_ENV = {
    "S3_STAGE_BUCKET": "stage-bucket",
    "PGSNOW_TABLES": "public.customers",
    "PGSNOW_PG_DSN": "dbname=x",
}


# --- configuration -------------------------------------------------------------------------------


def test_config_reports_every_problem_at_once() -> None:
    env = {"S3_FILE_FORMAT": "xml", "CLEANUP_S3_FILES": "sometimes", "EXTRACT_BATCH_ROWS": "many"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env, Component.EXTRACTOR)
    problems = caught.value.problems
    assert any("S3_STAGE_BUCKET" in p for p in problems)
    assert any("S3_FILE_FORMAT" in p and "'xml'" in p for p in problems)
    assert any("CLEANUP_S3_FILES" in p for p in problems)
    assert any("EXTRACT_BATCH_ROWS" in p for p in problems)
    assert any("PGSNOW_TABLES" in p for p in problems)
    assert any("PGSNOW_PG_SECRET_ARN" in p for p in problems)
    assert len(problems) == 6


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", CleanupMode.AFTER_ALL),
        ("TRUE", CleanupMode.AFTER_ALL),
        ("false", CleanupMode.NEVER),
        ("never", CleanupMode.NEVER),
        ("after_each", CleanupMode.AFTER_EACH),
        ("after_all", CleanupMode.AFTER_ALL),
    ],
    ids=["true", "upper-true", "false", "never", "after_each", "after_all"],
)
def test_cleanup_mode_accepts_the_specification_booleans(raw: str, expected: CleanupMode) -> None:
    settings = Settings.from_env({**BASE_ENV, "CLEANUP_S3_FILES": raw}, Component.CLEANUP)
    assert settings.cleanup_mode is expected


def test_config_defaults_follow_the_specification() -> None:
    settings = Settings.from_env(BASE_ENV, Component.EXTRACTOR)
    assert settings.prefix == "staging"
    assert settings.file_format is StagedFormat.CSV
    assert settings.cleanup_mode is CleanupMode.AFTER_ALL
    assert settings.snowflake.storage_integration is None


def test_loader_needs_snowflake_settings() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"S3_STAGE_BUCKET": "b"}, Component.LOADER)
    assert any("SNOWFLAKE_SECRET_ARN" in p for p in caught.value.problems)
    assert any("SNOWFLAKE_DATABASE" in p for p in caught.value.problems)


def test_prefix_is_normalised_and_dotdot_refused() -> None:
    assert (
        Settings.from_env({**BASE_ENV, "S3_STAGE_PREFIX": "/landing/"}, Component.CLEANUP).prefix == "landing"
    )
    with pytest.raises(ConfigError, match="S3_STAGE_PREFIX"):
        Settings.from_env({**BASE_ENV, "S3_STAGE_PREFIX": "a/../b"}, Component.CLEANUP)


def test_error_hierarchy_sorts_retryable_from_permanent() -> None:
    assert RetryableError("x").retryable is True
    assert PermanentError("x").retryable is False
    assert issubclass(ConfigError, PermanentError)
    err = PermanentError("bad file", table="public.t", s3_key="staging/public/t/f.csv")
    assert err.context()["s3_key"] == "staging/public/t/f.csv"
    assert "public.t" in str(err)


# --- identifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pg_name", "sf_name"),
    [
        ("customers", "CUSTOMERS"),
        ("order_id", "ORDER_ID"),
        ("OrderId", "OrderId"),
        ("order id", "order id"),
        ("Ünïcödé", "Ünïcödé"),
        ("select", "SELECT"),
    ],
    ids=["plain", "underscore", "mixed-case", "space", "unicode", "reserved-word"],
)
def test_case_policy(pg_name: str, sf_name: str) -> None:
    assert snowflake_name(pg_name) == sf_name


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("A", '"A"'), ('we"ird', '"we""ird"'), ("a;b", '"a;b"'), ("x.y", '"x.y"')],
    ids=["simple", "embedded-quote", "semicolon", "dot"],
)
def test_quote_ident_doubles_quotes(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


def test_name_collisions_are_errors() -> None:
    with pytest.raises(PermanentError, match="both map"):
        check_no_collisions(["amount", "AMOUNT"], what="column")
    check_no_collisions(["amount", "Amount"], what="column")  # AMOUNT vs Amount: distinct in Snowflake


def test_allowlist_refuses_unlisted_tables() -> None:
    allowlist = TableAllowlist.parse("public.customers, sales.orders")
    assert allowlist.check(TableRef("sales", "orders")) == TableRef("sales", "orders")
    with pytest.raises(UnsafeIdentifierError, match="allowlist"):
        allowlist.check(TableRef("public", "secrets"))
    assert TableAllowlist.parse("*").check(TableRef("any", "thing"))


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "a\\b", "new\nline"], ids=str)
def test_table_ref_refuses_path_like_names(bad: str) -> None:
    with pytest.raises(UnsafeIdentifierError):
        TableRef("public", bad)


# --- keys ------------------------------------------------------------------------------------------


def test_data_key_round_trips() -> None:
    run_id = new_run_id()
    table = TableRef("public", "order_lines")
    key = data_key("staging", table, 7, run_id, FileFormat.PARQUET)
    assert key == f"staging/public/order_lines/public_order_lines_batch7_{run_id}.parquet"
    parsed = parse_data_key(key, "staging")
    assert (parsed.table, parsed.batch, parsed.run_id, parsed.file_format) == (
        table,
        7,
        run_id,
        FileFormat.PARQUET,
    )


def test_hand_dropped_file_has_no_run() -> None:
    parsed = parse_data_key("staging/public/customers/my export.csv", "staging")
    assert parsed.run_id is None and parsed.batch is None
    assert parsed.file_format is FileFormat.CSV and parsed.gzip is False


@pytest.mark.parametrize(
    "key",
    [
        "other/public/customers/f.csv.gz",
        "staging/public/customers/../orders/f.csv.gz",
        "staging/public/f.csv.gz",
        "staging/public/customers/sub/f.csv.gz",
        "staging/public/customers/f.json",
        "_pgsnow/manifests/public/customers/x.json",
        "staging//customers/f.csv",
    ],
    ids=["outside-prefix", "dotdot", "too-short", "too-deep", "wrong-suffix", "manifest", "empty-part"],
)
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(PermanentError):
        parse_data_key(key, "staging")


def test_event_keys_are_url_decoded() -> None:
    assert decode_event_key("staging/public/t/my+file%C3%A9.csv") == "staging/public/t/my fileé.csv"


def test_manifest_key_is_outside_the_staging_prefix() -> None:
    key = manifest_key(TableRef("public", "customers"), "20260101T000000000000Z")
    assert not key.startswith("staging/")


# --- manifest --------------------------------------------------------------------------------------


def _manifest() -> RunManifest:
    sf = map_pg_type("numeric(12,2)")
    return RunManifest(
        run_id="20260101T000000000000Z",
        table=TableRef("public", "orders"),
        mode="full",
        file_format=FileFormat.CSV,
        columns=(
            Column.from_types("order_id", "integer", "integer", map_pg_type("integer"), False),
            Column.from_types("Total", "numeric(12,2)", "numeric(12,2)", sf, True),
        ),
        primary_key=("order_id",),
        state=RunState.STAGED,
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:05Z",
        files=(
            StagedFile("staging/public/orders/a.csv.gz", 1, 10, 123, "ab" * 32, FileFormat.CSV),
            StagedFile(
                "staging/public/orders/b.csv.gz",
                2,
                5,
                99,
                "cd" * 32,
                FileFormat.CSV,
                chunk=2,
                key_range=("11", "15"),
                cursor_range=("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
            ),
        ),
        cursor_column="updated_at",
        watermark_before="2025-12-31T00:00:00Z",
        watermark_after="2026-01-02T00:00:00Z",
        write_mode="merge",
        deletes="soft",
        key_list=StagedFile("_pgsnow/keys/public/orders/k.csv.gz", 0, 15, 50, "ef" * 32, FileFormat.CSV),
        timings={"extract": 1.5},
    )


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest()
    again = RunManifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.total_rows == 15
    assert '"snowflake_name": "ORDER_ID"' in manifest.to_json()


def test_malformed_manifest_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="malformed manifest"):
        RunManifest.from_json('{"format_version": 1}', s3_key="_pgsnow/manifests/x.json")


# --- type map --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pg_type", "kind", "sf_type"),
    [
        ("integer", ValueKind.INTEGER, "NUMBER(38,0)"),
        ("bigint", ValueKind.INTEGER, "NUMBER(38,0)"),
        ("numeric(10, 2)", ValueKind.DECIMAL, "NUMBER(10,2)"),
        ("numeric", ValueKind.DECIMAL, "NUMBER(38,10)"),
        ("double precision", ValueKind.FLOAT, "FLOAT"),
        ("character varying(40)", ValueKind.TEXT, "VARCHAR(134217728)"),
        ("boolean", ValueKind.BOOLEAN, "BOOLEAN"),
        ("timestamp without time zone", ValueKind.TIMESTAMP, "TIMESTAMP_NTZ(6)"),
        ("timestamp(3) with time zone", ValueKind.TIMESTAMPTZ, "TIMESTAMP_TZ(6)"),
        ("jsonb", ValueKind.JSON, "VARIANT"),
        ("integer[]", ValueKind.JSON, "VARIANT"),
        ("bytea", ValueKind.BINARY, "BINARY"),
        ("uuid", ValueKind.TEXT, "VARCHAR(134217728)"),
    ],
    ids=str,
)
def test_type_map(pg_type: str, kind: ValueKind, sf_type: str) -> None:
    mapped = map_pg_type(pg_type)
    assert (mapped.kind, mapped.sql) == (kind, sf_type)


def test_numeric_beyond_38_digits_is_staged_like_unbounded_numeric() -> None:
    # Its values may well fit 38 digits: NUMBER(38, s), s chosen from the data (docs/type-mapping.md)
    mapped = map_pg_type("numeric(40,2)")
    assert (mapped.kind, mapped.sql) == (ValueKind.DECIMAL, "NUMBER(38,10)")


# --- per-table options -----------------------------------------------------------------------------


def test_table_options_parse_and_default() -> None:
    from pgsnow.config import DeleteMode, ExtractMode, TableOptions, WriteMode

    env = {
        **BASE_ENV,
        "PGSNOW_TABLES": "public.customers,public.orders",
        "PGSNOW_TABLE_OPTIONS": '{"public.orders": {"mode": "incremental", "cursor_column": "updated_at",'
        ' "lookback_seconds": 300, "write_mode": "merge", "deletes": "soft"}}',
    }
    settings = Settings.from_env(env, Component.EXTRACTOR)
    orders = settings.table_options(TableRef("public", "orders"))
    assert (orders.mode, orders.cursor_column, orders.lookback_seconds) == (
        ExtractMode.INCREMENTAL,
        "updated_at",
        300,
    )
    assert (orders.write_mode, orders.deletes) == (WriteMode.MERGE, DeleteMode.SOFT)
    assert settings.table_options(TableRef("public", "customers")) == TableOptions()


def test_table_options_report_every_problem() -> None:
    env = {
        **BASE_ENV,
        "PGSNOW_TABLE_OPTIONS": '{"public.customers": {"mode": "incremental", "write_mode": "upsert",'
        ' "colour": "blue", "lookback_seconds": -1}, "public.other": {}}',
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env, Component.EXTRACTOR)
    text = "; ".join(caught.value.problems)
    assert "needs cursor_column" in text
    assert "write_mode must be append, merge, replace" in text
    assert "unknown option 'colour'" in text
    assert "lookback_seconds" in text
    assert "public.other, which is not in PGSNOW_TABLES" in text


def test_loader_settings_validate_method_and_on_error() -> None:
    env = {"S3_STAGE_BUCKET": "b", "SNOWFLAKE_ACCOUNT": "a", "SNOWFLAKE_DATABASE": "D"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "LOAD_METHOD": "snowpipe", "LOAD_ON_ERROR": "ignore"}, Component.LOADER)
    text = "; ".join(caught.value.problems)
    assert "SNOWPIPE_NAME is required" in text and "LOAD_ON_ERROR" in text
    settings = Settings.from_env({**env, "LOAD_ON_ERROR": "skip_file"}, Component.LOADER)
    assert settings.load.on_error.value == "SKIP_FILE"


@pytest.mark.parametrize(
    ("integration", "refused"),
    [pytest.param("", True, id="credentials-method"), pytest.param("PGSNOW_S3", False, id="integration")],
)
def test_snowpipe_is_refused_without_a_storage_integration(integration: str, refused: bool) -> None:
    """Snowpipe reads after the loader returned: the loader's temporary credentials may be gone."""
    env = {
        "S3_STAGE_BUCKET": "b",
        "SNOWFLAKE_ACCOUNT": "a",
        "SNOWFLAKE_DATABASE": "D",
        "LOAD_METHOD": "snowpipe",
        "SNOWPIPE_NAME": "P",
        "SNOWFLAKE_STORAGE_INTEGRATION": integration,
    }
    if not refused:
        assert Settings.from_env(env, Component.LOADER).load.method.value == "snowpipe"
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "LOAD_ON_ERROR": "ignore"}, Component.LOADER)
    text = "; ".join(caught.value.problems)
    assert "LOAD_METHOD=snowpipe needs SNOWFLAKE_STORAGE_INTEGRATION" in text
    assert "temporary AWS credentials" in text and "expired" in text
    assert "LOAD_ON_ERROR" in text  # reported with the other problems, in one ConfigError
