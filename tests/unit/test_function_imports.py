"""Each function imports only what its Lambda artifact ships.

pyarrow (~140 MB unpacked) is in the extractor's requirements only; the loader's and the
cleanup's artifacts would fail at their first import if their code reached it. ``make build``
imports each built artifact; this checks the same in the test suite, where a change lands first.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

NOT_SHIPPED = {"loader": ["pyarrow"], "cleanup": ["pyarrow"]}


@pytest.mark.parametrize("function", sorted(NOT_SHIPPED))
def test_handler_imports_without_what_its_artifact_does_not_ship(function: str) -> None:
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_SHIPPED[function])
    code = (
        f"import sys; {blocked}\n"
        "from pgsnow.local.stack import load_function_handler\n"
        f"load_function_handler({function!r})\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
