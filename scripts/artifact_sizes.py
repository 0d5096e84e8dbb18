"""Print each Lambda artifact's unzipped size and fail if one exceeds Lambda's limit.

Run after ``sam build``: ``python scripts/artifact_sizes.py .aws-sam/build --functions
ExtractorFunction LoaderFunction CleanupFunction --limit-mb 250``. Lambda's limit for a
function's unzipped code (with its layers) is 250 MB, counted in MiB (262,144,000 bytes).
Exit status: 0 when every artifact fits, 1 when one does not or is missing.
Standard library only, so it runs from the SAM tools virtualenv.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
LAMBDA_UNZIPPED_LIMIT_MB = 250
TOP_ENTRIES_SHOWN = 5


@dataclass(frozen=True)
class ArtifactSize:
    function: str
    total_bytes: int
    file_count: int
    largest_entries: tuple[tuple[str, int], ...]  # top-level file or folder, bytes

    @property
    def total_mib(self) -> float:
        return self.total_bytes / MIB


def tree_bytes(path: Path) -> tuple[int, int]:
    """Return (bytes, files) under ``path``; symlinks are counted as links, not followed."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size, 1
    total, count = 0, 0
    for child in path.rglob("*"):
        if child.is_symlink() or child.is_file():
            total += child.lstat().st_size
            count += 1
    return total, count


def measure_artifact(artifact_dir: Path) -> ArtifactSize:
    entries: list[tuple[str, int]] = []
    total_bytes, file_count = 0, 0
    for entry in artifact_dir.iterdir():
        entry_bytes, entry_files = tree_bytes(entry)
        entries.append((entry.name, entry_bytes))
        total_bytes += entry_bytes
        file_count += entry_files
    entries.sort(key=lambda name_and_bytes: name_and_bytes[1], reverse=True)
    return ArtifactSize(artifact_dir.name, total_bytes, file_count, tuple(entries[:TOP_ENTRIES_SHOWN]))


def report_artifacts(build_dir: Path, functions: list[str], limit_mb: int) -> int:
    """Print one line per function (and its largest parts); return the process exit status."""
    failures: list[str] = []
    print(f"{'function':<20} {'unzipped MiB':>12} {'files':>7}   largest parts")
    for function in functions:
        artifact_dir = build_dir / function
        if not artifact_dir.is_dir():
            failures.append(f"{function}: no artifact at {artifact_dir}")
            continue
        size = measure_artifact(artifact_dir)
        parts = ", ".join(f"{name} {entry_bytes / MIB:.1f}" for name, entry_bytes in size.largest_entries)
        print(f"{function:<20} {size.total_mib:>12.1f} {size.file_count:>7}   {parts}")
        if size.total_bytes > limit_mb * MIB:
            failures.append(f"{function}: {size.total_mib:.1f} MiB unzipped exceeds the {limit_mb} MiB limit")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if not failures:
        print(f"all {len(functions)} artifacts are within {limit_mb} MiB unzipped")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("build_dir", type=Path, help="sam build output, e.g. .aws-sam/build")
    parser.add_argument(
        "--functions",
        nargs="+",
        required=True,
        help="logical ids of the functions whose artifacts must exist",
    )
    parser.add_argument("--limit-mb", type=int, default=LAMBDA_UNZIPPED_LIMIT_MB)
    args = parser.parse_args(argv)
    return report_artifacts(args.build_dir, args.functions, args.limit_mb)


if __name__ == "__main__":
    sys.exit(main())
