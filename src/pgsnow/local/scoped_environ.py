"""``os.environ`` as one function sees it, on the thread that runs that function's handler.

Deployed, each function is a process of its own, with the environment its template gives it.
Locally every function's handler runs in one process, several at once (the loader's dispatcher
thread, the range workers, the change-capture schedule, a test's own thread), and a process has
one environment. So while a local stack's handlers are in place (``installed()``, entered by
``LocalStack.handlers()``), ``os.environ`` is a ``ScopedEnviron``:

* on a thread inside ``function_scope(environment)`` (one handler invocation) it is exactly
  ``environment``: reads see only those variables, and writes stay in the invocation;
* on any other thread it is the process's own environment, reads and writes passed through.

Only Python's view is scoped: ``os.environ``, ``os.getenv`` and what reads them (pgsnow.config,
boto3, Powertools). libpq and other C code read the process's C-level environment, and a thread
a handler starts sees the process's environment (pgsnow reads its settings on the invoking
thread, before it starts any). docs/local-fidelity.md, "Each function's environment".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

_scopes = threading.local()  # .environments: this thread's open function scopes, innermost last


class _Installs:
    """How many ``installed()`` are open (the last to close puts the process's mapping back)."""

    lock = threading.Lock()
    count = 0


class ScopedEnviron(MutableMapping[str, str]):
    """``os.environ``'s stand-in: a function's environment on a thread in its scope, else ``process``."""

    def __init__(self, process: MutableMapping[str, str]) -> None:
        self.process = process

    def current(self) -> MutableMapping[str, str]:
        environments: list[dict[str, str]] = getattr(_scopes, "environments", [])
        return environments[-1] if environments else self.process

    def __getitem__(self, name: str) -> str:
        return self.current()[name]

    def __setitem__(self, name: str, value: str) -> None:
        self.current()[name] = value

    def __delitem__(self, name: str) -> None:
        del self.current()[name]

    def __iter__(self) -> Iterator[str]:
        # A snapshot: the process environment may change on another thread while this iterates.
        return iter(list(self.current()))

    def __len__(self) -> int:
        return len(self.current())

    def copy(self) -> dict[str, str]:
        """What ``os.environ.copy()`` returns: a plain dict of the current view."""
        return dict(self.current())

    def __repr__(self) -> str:
        return f"ScopedEnviron({dict(self.current())!r})"

    def __getattr__(self, name: str) -> Any:
        # os._Environ's own attributes (encodekey, ...), for code that reaches past the mapping.
        return getattr(self.process, name)


@contextmanager
def installed() -> Iterator[ScopedEnviron]:
    """``os.environ`` is a ``ScopedEnviron`` for the duration (nested uses share one)."""
    with _Installs.lock:
        if _Installs.count == 0:
            # Replaced, not cleared (the process's variables stay): os.getenv and everything else
            # look os.environ up when they run, so the stand-in reaches them.
            os.environ = ScopedEnviron(os.environ)  # type: ignore[assignment]  # noqa: B003
        _Installs.count += 1
        scoped = os.environ
    try:
        assert isinstance(scoped, ScopedEnviron)
        yield scoped
    finally:
        with _Installs.lock:
            _Installs.count -= 1
            if _Installs.count == 0 and isinstance(os.environ, ScopedEnviron):
                os.environ = os.environ.process  # type: ignore[assignment]  # noqa: B003


@contextmanager
def function_scope(environment: Mapping[str, str]) -> Iterator[None]:
    """On this thread, for the duration, ``os.environ`` is a copy of ``environment`` and nothing else
    (takes effect while ``installed()``)."""
    environments: list[dict[str, str]] = getattr(_scopes, "environments", None) or []
    _scopes.environments = environments
    environments.append(dict(environment))
    try:
        yield
    finally:
        environments.pop()
