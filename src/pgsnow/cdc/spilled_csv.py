"""Staged-text spills → CSV.gz change files, compressed as they are, during the read when possible.

A spill in staged text (``pgsnow.cdc.staged_text``) is the content of its table's files already;
staging it is compressing it behind the header, cutting a file at the first row boundary the
reader recorded (``SpilledChanges.cuts``) once the file reaches EXTRACT_TARGET_FILE_MB.
``SpilledCsvWriter`` does that for one table's spills.

``EarlyCompression`` starts while the slot is still being read: the reader reports each row
boundary of committed rows (``ReplicationSession.read(on_final=...)``; a committed transaction is
never cut back, only one in progress is), and a background thread compresses up to it. Reading is
one core's Python while the server decodes on the other, which leaves room for compression
(isal releases the GIL); on the CDC benchmark it was half of what came after the read. Staging
then only finishes the last rows (``files_for``). What it compressed is used only when staging
would have written the same files: one staged-text segment for the table, the same header; otherwise
it is deleted and staging proceeds as if nothing had been done early. At most
``MAX_EARLY_SEGMENTS`` segments are compressed early (bounded file descriptors and memory); the
others are left to staging.

Given ``uploads`` and ``key_for``, a file compressed early is also uploaded as it grows, part by
part, to the key staging gives it (``pgsnow.streamed_upload``); ``upload_of`` hands its finished
upload to staging, which completes it after the run's manifest. A file discarded here has its
upload aborted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from pgsnow.cdc.staged_text import header_line
from pgsnow.changes import CHANGE_COLUMNS
from pgsnow.errors import PermanentError
from pgsnow.formats import CsvGzipWriter, WrittenFile
from pgsnow.streamed_upload import StreamedUpload, StreamedUploads

__all__ = ["EarlyCompression", "SpilledCsvWriter", "write_spilled_csv"]

# Bytes read from a spill at once.
SPILL_READ_BYTES = 4 << 20
# Segments compressed early at once, each holding its spill and its current file open with a
# compressor's buffers: file descriptors (Lambda allows 1,024; the reader keeps up to 64) and memory
# stay bounded whatever the number of tables. The segments reported past this many are compressed
# by staging, as without early compression.
MAX_EARLY_SEGMENTS = 16


class _Column(Protocol):
    @property
    def name(self) -> str: ...


class _Relation(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def columns(self) -> Sequence[_Column]: ...


class _Segment(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def rows(self) -> int: ...
    @property
    def cuts(self) -> Sequence[tuple[int, int]]: ...


def spill_header(relation: _Relation) -> bytes:
    """The files' header: the change columns, then the relation's (as ``describe_table`` lists them)."""
    return header_line([*CHANGE_COLUMNS, *(c.name for c in relation.columns)])


class SpilledCsvWriter:
    """One table's CSV.gz files from its staged-text spills, advanced row boundary by row boundary.

    ``start_upload(batch, path)``: each file's streamed upload (``pgsnow.streamed_upload``), fed as
    the file grows and sealed when it is cut; ``uploads`` then holds them by file path."""

    def __init__(
        self,
        header: bytes,
        work_dir: Path,
        max_bytes: int,
        *,
        start_upload: Callable[[int, Path], StreamedUpload] | None = None,
    ) -> None:
        self._header = header
        self._work_dir = work_dir
        self._max_bytes = max_bytes
        self._start_upload = start_upload
        self._current: CsvGzipWriter | None = None
        self._upload: StreamedUpload | None = None
        self._batch = 1
        self.files: list[WrittenFile] = []
        self.uploads: dict[Path, StreamedUpload] = {}

    def advance(self, spill: BinaryIO, offset: int, to_offset: int, rows: int) -> None:
        """Compress ``spill`` from ``offset`` (where it is positioned) to ``to_offset``, ``rows`` rows,
        a row boundary; the file is cut there when it has reached the size."""
        if to_offset <= offset:
            return  # no rows: a file is never started for none
        if self._current is None:
            path = self._work_dir / f"batch{self._batch}.csv.gz"
            self._current = CsvGzipWriter(path, self._batch, self._header)
            if self._start_upload is not None:
                self._upload = self._start_upload(self._batch, path)
            self._batch += 1
        while offset < to_offset:
            data = spill.read(min(to_offset - offset, SPILL_READ_BYTES))
            if not data:
                raise PermanentError(f"the spill file {Path(spill.name).name} is shorter than recorded")
            self._current.write_block(data, rows, None, None)
            rows = 0  # counted with the block's first piece
            offset += len(data)
            # Within the boundary too: one transaction's rows may be far more than a part.
            if self._upload is not None and self._upload.wants(self._current.compressed_bytes):
                self._upload.upload_through(self._current.flush_written())
        if self._current.compressed_bytes >= self._max_bytes:
            self._close_current()

    def _close_current(self) -> None:
        assert self._current is not None
        written = self._current.close()
        self.files.append(written)
        self._current = None
        if self._upload is not None:
            self._upload.seal(written.bytes)
            self.uploads[written.path] = self._upload
            self._upload = None

    def finish(self) -> list[WrittenFile]:
        if self._current is not None:
            self._close_current()
        return self.files

    def discard(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        if self._upload is not None:
            self._upload.abort()
            self._upload = None
        for upload in self.uploads.values():
            upload.abort()
        self.uploads.clear()
        for written in self.files:
            written.path.unlink(missing_ok=True)
        self.files.clear()


def write_spilled_csv(
    segments: Sequence[_Segment], header: bytes, *, work_dir: Path, max_bytes: int
) -> list[WrittenFile]:
    """A table's staged-text spills as CSV.gz files (module docstring), all at once."""
    writer = SpilledCsvWriter(header, work_dir, max_bytes)
    for segment in segments:
        with segment.path.open("rb") as spill:
            offset = rows = 0
            for cut_offset, cut_rows in segment.cuts:
                writer.advance(spill, offset, cut_offset, cut_rows - rows)
                offset, rows = cut_offset, cut_rows
        if rows != segment.rows:
            raise PermanentError(
                f"the spill file {segment.path.name} holds {rows} rows where {segment.rows} were written"
            )
    return writer.finish()


@dataclass
class _Job:
    """One segment compressed early: how far, into which files."""

    path: Path
    header: bytes
    writer: SpilledCsvWriter
    spill: BinaryIO | None = None
    offset: int = 0
    rows: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


_FINISH = (-1, -1)


class EarlyCompression:
    """Compresses staged-text spills on a background thread while the read goes on (module docstring).

    ``final_rows`` is the reader's ``on_final`` callback (reader thread); ``files_for`` is called
    by staging (any thread) once the read is over; ``close`` stops the thread, deletes whatever
    was not handed to staging, and aborts every streamed upload not completed.
    """

    def __init__(
        self,
        work_dir: Path,
        max_bytes: int,
        *,
        tables: Collection[tuple[str, str]] | None = None,
        max_segments: int = MAX_EARLY_SEGMENTS,
        uploads: StreamedUploads | None = None,
        key_for: Callable[[str, str, int], str] | None = None,
    ) -> None:
        self._work_dir = work_dir
        # Files uploaded as they are compressed (pgsnow.streamed_upload), to key_for(schema, table,
        # batch): the key staging gives the file. ``upload_of`` hands a finished one to staging;
        # ``close`` closes ``uploads``, aborting what was not completed by then.
        self._uploads = uploads
        self._key_for = key_for
        self._finished_uploads: dict[Path, StreamedUpload] = {}
        # (schema, table) of the tables to compress early (None: every one): those that stage CSV.
        self._tables = None if tables is None else frozenset(tables)
        self._max_bytes = max_bytes
        self._max_segments = max_segments
        self._jobs: dict[Path, _Job] = {}
        self._declined: set[Path] = set()  # reported while max_segments were compressed already
        self._started = 0  # jobs started, which names their directories
        self._queue: queue.SimpleQueue[tuple[_Job, tuple[int, int]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pgsnow-early-compression", daemon=True)
        self._thread.start()

    def final_rows(self, path: Path, relation: _Relation, offset: int, rows: int) -> None:
        """Rows of the spill at ``path`` up to ``offset`` (``rows`` of them) will not change."""
        job = self._jobs.get(path)
        if job is None:
            if offset <= 0 or path in self._declined:
                return  # nothing to compress yet, or left to staging
            if self._tables is not None and (relation.namespace, relation.name) not in self._tables:
                self._declined.add(path)
                return
            if len(self._jobs) >= self._max_segments:
                self._declined.add(path)
                return
            out_dir = self._work_dir / f"{self._started:05d}"
            out_dir.mkdir(parents=True)
            self._started += 1
            header = spill_header(relation)
            writer = SpilledCsvWriter(
                header, out_dir, self._max_bytes, start_upload=self._upload_starter(relation)
            )
            job = self._jobs[path] = _Job(path, header, writer)
        self._queue.put((job, (offset, rows)))

    def files_for(self, segment: _Segment, header: bytes) -> list[WrittenFile] | None:
        """The segment's files, compressed to its end (the rest after the last reported boundary), or
        None when it was not compressed early or not under ``header``."""
        job = self._jobs.pop(segment.path, None)
        if job is None:
            return None
        for cut in segment.cuts:  # the worker skips those it has compressed already
            self._queue.put((job, cut))
        self._queue.put((job, _FINISH))
        job.done.wait()
        if job.error is not None:
            job.writer.discard()
            raise job.error
        if job.header != header or job.rows != segment.rows:
            job.writer.discard()
            return None
        for written in job.writer.files:
            upload = job.writer.uploads.get(written.path)
            if upload is not None and upload.finish() is not None:
                self._finished_uploads[written.path] = upload
        return job.writer.files

    def upload_of(self, written: WrittenFile) -> StreamedUpload | None:
        """The finished streamed upload of a file ``files_for`` returned, still to be completed once the
        run's manifest is written; None when the file was not streamed (it is uploaded whole)."""
        return self._finished_uploads.pop(written.path, None)

    def _upload_starter(self, relation: _Relation) -> Callable[[int, Path], StreamedUpload] | None:
        uploads, key_for = self._uploads, self._key_for
        if uploads is None or key_for is None:
            return None
        schema, table = relation.namespace, relation.name
        return lambda batch, path: uploads.start(key_for(schema, table, batch), path, batch)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, (offset, rows) = item
            if (offset, rows) == _FINISH:
                try:
                    if job.error is None:
                        job.writer.finish()
                except BaseException as exc:  # handed to staging by files_for
                    job.error = exc
                finally:
                    self._close_spill(job)
                    job.done.set()
                continue
            if job.error is not None or offset <= job.offset:
                continue
            try:
                if job.spill is None:
                    job.spill = job.path.open("rb")
                job.writer.advance(job.spill, job.offset, offset, rows - job.rows)
                job.offset, job.rows = offset, rows
            except BaseException as exc:  # handed to staging by files_for
                job.error = exc

    @staticmethod
    def _close_spill(job: _Job) -> None:
        if job.spill is not None:
            job.spill.close()
            job.spill = None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        for job in self._jobs.values():
            self._close_spill(job)
            job.writer.discard()
        self._jobs.clear()
        if self._uploads is not None:
            self._uploads.close()  # aborts those not completed: a failed run's
