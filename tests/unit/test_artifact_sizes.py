"""scripts/artifact_sizes.py: sizes are summed from real files and the limit fails the build."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "artifact_sizes.py"
MIB = 1024 * 1024


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("artifact_sizes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def make_artifact(build_dir: Path, function: str, files: dict[str, int]) -> Path:
    artifact = build_dir / function
    for relative, size in files.items():
        path = artifact / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(size)  # sparse: the apparent size is what Lambda counts
    return artifact


def test_measure_artifact_sums_nested_files(tmp_path: Path) -> None:
    artifacts = load_script()
    artifact = make_artifact(
        tmp_path, "LoaderFunction", {"app.py": 100, "pkg/a.py": 2 * MIB, "pkg/sub/b.so": 3 * MIB}
    )
    size = artifacts.measure_artifact(artifact)
    assert size.total_bytes == 100 + 5 * MIB
    assert size.file_count == 3
    assert size.largest_entries[0] == ("pkg", 5 * MIB)


@pytest.mark.parametrize(
    ("extractor_mib", "limit_mb", "expected_status"),
    [
        pytest.param(10, 250, 0, id="fits"),
        pytest.param(250, 250, 0, id="exactly-the-limit"),
        pytest.param(251, 250, 1, id="over-the-limit"),
    ],
)
def test_command_fails_over_the_limit(
    tmp_path: Path, extractor_mib: int, limit_mb: int, expected_status: int
) -> None:
    # Given two artifacts, the extractor of the given size
    make_artifact(tmp_path, "ExtractorFunction", {"pyarrow/lib.so": extractor_mib * MIB})
    make_artifact(tmp_path, "LoaderFunction", {"app.py": 10})
    # When the size report runs as the build runs it
    functions = ["ExtractorFunction", "LoaderFunction"]
    command = [
        sys.executable,
        str(SCRIPT),
        str(tmp_path),
        "--functions",
        *functions,
        "--limit-mb",
        str(limit_mb),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
    )
    # Then the exit status says whether everything fits, and every function is listed
    assert result.returncode == expected_status, result.stdout + result.stderr
    assert "ExtractorFunction" in result.stdout
    assert "LoaderFunction" in result.stdout
    assert ("exceeds the 250 MiB limit" in result.stderr) is (expected_status == 1)


def test_missing_artifact_fails(tmp_path: Path) -> None:
    artifacts = load_script()
    make_artifact(tmp_path, "LoaderFunction", {"app.py": 10})
    assert artifacts.report_artifacts(tmp_path, ["LoaderFunction", "CleanupFunction"], 250) == 1
