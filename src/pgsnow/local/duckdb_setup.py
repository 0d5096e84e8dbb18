"""DuckDB's httpfs and spatial extensions from PyPI, so the local Snowflake reads ``s3://`` and
holds GEOMETRY/GEOGRAPHY values offline.

DuckDB normally downloads extensions from its own site on first use. The
``duckdb-extension-httpfs`` and ``duckdb-extension-spatial`` wheels ship the same binaries, and
``duckdb_extensions.import_extension`` copies it into DuckDB's extension
directory, so nothing is downloaded at run time. Run once after ``pip install``
(the Makefile does): ``python -m pgsnow.local.duckdb_setup``.
"""

from __future__ import annotations

import duckdb

HTTPFS = "httpfs"
SPATIAL = "spatial"


def extension_is_installed(name: str) -> bool:
    """Whether DuckDB can load extension ``name`` from its extension directory without downloading it."""
    with duckdb.connect(":memory:") as probe:
        row = probe.execute(
            "SELECT installed FROM duckdb_extensions() WHERE extension_name = ?", [name]
        ).fetchone()
    return bool(row and row[0])


def httpfs_is_installed() -> bool:
    return extension_is_installed(HTTPFS)


def ensure_extension(name: str) -> None:
    """Install extension ``name`` from its PyPI package (duckdb-extension-<name>) when DuckDB does
    not have it yet; idempotent, never downloads."""
    if extension_is_installed(name):
        return
    from duckdb_extensions import import_extension

    import_extension(name)
    if not extension_is_installed(name):
        raise RuntimeError(
            f"DuckDB's {name} extension is still not installed after importing it from "
            f"duckdb-extension-{name}; check that its version matches duckdb's"
        )


def ensure_httpfs() -> None:
    ensure_extension(HTTPFS)


def load_httpfs(connection: duckdb.DuckDBPyConnection) -> None:
    """Load httpfs into a DuckDB database, installing it from PyPI first if needed."""
    ensure_httpfs()
    connection.execute("LOAD httpfs")


def load_spatial(connection: duckdb.DuckDBPyConnection) -> None:
    """Load spatial into a DuckDB database, installing it from PyPI first if needed."""
    ensure_extension(SPATIAL)
    connection.execute("LOAD spatial")


def main() -> None:
    ensure_httpfs()
    ensure_extension(SPATIAL)
    print(f"duckdb {duckdb.__version__}: httpfs and spatial installed")


if __name__ == "__main__":
    main()
