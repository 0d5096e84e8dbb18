"""The pgsnow command line: parsing, the command registry and the report format."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pgsnow.cli import COMMANDS, build_parser, format_report, main, run_demo_command
from pgsnow.identifiers import TableRef

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(
            ["demo"], {"pg_dsn": None, "schema": None, "tables": None, "format": "csv"}, id="demo-defaults"
        ),
        pytest.param(
            ["demo", "--tables", "public.orders,sales.lines", "--format", "parquet"],
            {"tables": [TableRef("public", "orders"), TableRef("sales", "lines")], "format": "parquet"},
            id="demo-tables",
        ),
        pytest.param(
            ["demo", "--schema", "shop", "--pg-dsn", "dbname=x", "--data-dir", "/tmp/d"],
            {"schema": "shop", "pg_dsn": "dbname=x", "data_dir": Path("/tmp/d")},
            id="demo-schema",
        ),
        pytest.param(["local", "up", "--pg-dsn", "dbname=y"], {"pg_dsn": "dbname=y"}, id="local-up"),
        pytest.param(["local", "sql", "SELECT 1"], {"statement": "SELECT 1"}, id="local-sql"),
        pytest.param(["extract", "shop.orders"], {"table": TableRef("shop", "orders")}, id="extract"),
    ],
)
def test_parser_reads_each_subcommand(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert callable(args.run)
    for name, value in expected.items():
        assert getattr(args, name) == value


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["demo", "--schema", "a", "--tables", "a.b"], id="schema-and-tables"),
        pytest.param(["demo", "--format", "json"], id="unknown-format"),
        pytest.param(["demo", "--scale", "0"], id="zero-scale"),
        pytest.param([], id="no-command"),
    ],
)
def test_parser_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_a_new_command_is_one_registrar_function() -> None:
    # Given a registrar added to COMMANDS, the way status (pgsnow.cli_status) was
    def add_example(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        subparsers.add_parser("example").set_defaults(run=lambda _args: 0)

    COMMANDS.append(add_example)
    try:
        # When the parser is built
        args = build_parser().parse_args(["example"])
    finally:
        COMMANDS.remove(add_example)
    # Then the new subcommand parses and runs
    assert args.run(args) == 0


def test_report_lines_are_aligned_and_give_the_reason_unless_ok() -> None:
    lines = format_report(
        [
            ("shop.customers", 5003, 5003, "OK", "all rows and cells match"),
            ("shop.order_lines", 200000, 199999, "MISMATCH", "1 missing from Snowflake"),
            ("shop.bad", None, None, "FAILED", "replicating: column 'd' has an infinite date/time"),
        ]
    )
    assert lines == [
        "shop.customers      5003    5003  OK",
        "shop.order_lines  200000  199999  MISMATCH  1 missing from Snowflake",
        "shop.bad               -       -  FAILED    replicating: column 'd' has an infinite date/time",
    ]
    assert format_report([]) == []


def test_demo_command_is_wired_to_run_demo() -> None:
    assert build_parser().parse_args(["demo"]).run is run_demo_command


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(
            ["--loader-batch-size", "20", "--loader-batching-window", "0"], id="above-ten-without-window"
        ),
        pytest.param(["--loader-batch-size", "10001"], id="batch-above-lambdas-maximum"),
        pytest.param(["--loader-batching-window", "301"], id="window-above-lambdas-maximum"),
    ],
)
def test_local_up_refuses_batching_lambda_would_refuse(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The check comes before any server starts, so nothing is started here.
    assert main(["local", "up", "--data-dir", str(tmp_path), *argv]) == 2
    assert "batch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
