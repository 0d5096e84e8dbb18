"""DuckDB's httpfs extension from PyPI, so the local Snowflake reads ``s3://`` offline.

DuckDB normally downloads extensions from its own site on first use. The
``duckdb-extension-httpfs`` wheel ships the same binary, and
``duckdb_extensions.import_extension`` copies it into DuckDB's extension
directory, so nothing is downloaded at run time. Run once after ``pip install``
(the Makefile does): ``python -m pgsnow.local.duckdb_setup``.
"""

from __future__ import annotations

import duckdb

HTTPFS = "httpfs"


def httpfs_is_installed() -> bool:
    """Whether DuckDB can load httpfs from its extension directory without downloading it."""
    with duckdb.connect(":memory:") as probe:
        row = probe.execute(
            "SELECT installed FROM duckdb_extensions() WHERE extension_name = ?", [HTTPFS]
        ).fetchone()
    return bool(row and row[0])


def ensure_httpfs() -> None:
    """Install httpfs from the PyPI package when DuckDB does not have it yet; idempotent, never downloads."""
    if httpfs_is_installed():
        return
    from duckdb_extensions import import_extension

    import_extension(HTTPFS)
    if not httpfs_is_installed():
        raise RuntimeError(
            "DuckDB's httpfs extension is still not installed after importing it from "
            "duckdb-extension-httpfs; check that its version matches duckdb's"
        )


def load_httpfs(connection: duckdb.DuckDBPyConnection) -> None:
    """Load httpfs into a DuckDB database, installing it from PyPI first if needed."""
    ensure_httpfs()
    connection.execute("LOAD httpfs")


def main() -> None:
    ensure_httpfs()
    print(f"duckdb {duckdb.__version__}: httpfs installed")


if __name__ == "__main__":
    main()
