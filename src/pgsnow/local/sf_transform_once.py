"""fakesnow's statement rewrite, with the statement copied once instead of once per pass.

fakesnow turns each Snowflake statement into DuckDB's with some twenty
``Expression.transform`` passes (``FakeSnowflakeCursor._transform``), and sqlglot's
``transform`` deep-copies the whole tree on every pass unless told ``copy=False``. Profiled on the
dataset suites, those copies were about a quarter of the local Snowflake's CPU time. Here the
statement is copied once when the rewrite starts, and every pass of that rewrite changes the copy
in place: the passes see the same trees as before, so the DuckDB SQL is the same.

Only the rewrite's own thread is affected (a thread-local flag), and only while it runs; every
other ``transform`` call in the process keeps sqlglot's default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlglot import exp

_rewriting = threading.local()
_INSTALLED = "_pgsnow_copies_once"


def install() -> None:
    """Patch ``Expression.transform`` and fakesnow's cursor rewrite (once per process)."""
    from fakesnow.cursor import FakeSnowflakeCursor

    if getattr(FakeSnowflakeCursor._transform, _INSTALLED, False):
        return
    sqlglot_transform: Callable[..., Any] = exp.Expression.transform
    fakesnow_rewrite: Callable[..., Any] = FakeSnowflakeCursor._transform

    def transform(
        self: exp.Expression, fun: Callable[..., Any], *args: Any, copy: bool = True, **kwargs: Any
    ) -> Any:
        in_place = getattr(_rewriting, "active", False)
        return sqlglot_transform(self, fun, *args, copy=copy and not in_place, **kwargs)

    def rewrite_copying_once(cursor: Any, expression: exp.Expression, params: Any) -> Any:
        statement = expression.copy()  # the caller's tree stays as it was, as with copy=True
        _rewriting.active = True
        try:
            return fakesnow_rewrite(cursor, statement, params)
        finally:
            _rewriting.active = False

    setattr(rewrite_copying_once, _INSTALLED, True)
    exp.Expression.transform = transform  # type: ignore[method-assign]
    FakeSnowflakeCursor._transform = rewrite_copying_once  # type: ignore[method-assign,assignment]
