"""Staged files uploaded while they are still being written, made visible only when told.

A change-capture run compresses its largest files while the slot is still being read
(``pgsnow.cdc.spilled_csv.EarlyCompression``). Uploading each file only after the read meant the
upload of the biggest one came after everything else: on the CDC benchmark, a 54 MB file's upload
was a third of the drain. Here a file's parts go up as the compressor writes them: a multipart
upload, started once the file holds a whole part, one part per ``PART_BYTES`` of compressed bytes,
read back from the local file (which is append-only, so what was flushed does not change).

Nothing is visible until ``complete`` (CompleteMultipartUpload): S3 creates the object, and sends
its notification, only then. The drain completes a file after writing its run's manifest, so the
"manifest first" order of every staged file holds (docs/guarantees.md). An upload that is never
completed (the run failed, the process died) is aborted by ``StreamedUploads.close``, or by the
bucket's AbortIncompleteMultipartUpload rule (template.yaml) when nothing was left to abort it.

Identity: the object's metadata is set when the upload starts, before its content exists, so it
cannot carry ``pgsnow-sha256``. The upload is made with ``ChecksumAlgorithm=SHA256`` instead:
each part carries its SHA-256, which S3 verifies, and S3 reports the object's checksum over the
parts' digests, which the run's manifest lists (``pgsnow.staging.parts_checksum``/``staged_checksum``).

Memory: at most ``parts_in_flight`` parts are held at once, each by the thread uploading it; the
compressor waits for a free slot (back-pressure) rather than buffering more.

An upload whose part failed is abandoned, with a warning: ``finish`` returns None, and the file is
uploaded whole afterwards, as a file that was not streamed.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pgsnow.manifest import META_BATCH, META_RUN_ID
from pgsnow.observability import logger
from pgsnow.staging import classify_s3_error, content_headers, parts_checksum

__all__ = ["PART_BYTES", "StreamedUpload", "StreamedUploads"]

# boto3's default part size (pgsnow.staging.UPLOAD_CONFIG's); S3's minimum is 5 MiB but for the last.
PART_BYTES = 8 << 20
# Parts read and uploading at once, over every file of a run (each is held in memory while it goes).
PARTS_IN_FLIGHT = 4


class StreamedUploads:
    """One run's streamed uploads: the part uploaders and what is still open. Thread-safe."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        *,
        run_id: str,
        part_bytes: int = PART_BYTES,
        parts_in_flight: int = PARTS_IN_FLIGHT,
    ) -> None:
        if part_bytes < 1:
            raise ValueError("part_bytes must be positive")
        self.s3 = s3
        self.bucket = bucket
        self.run_id = run_id
        self.part_bytes = part_bytes
        self._slots = threading.BoundedSemaphore(parts_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=parts_in_flight, thread_name_prefix="pgsnow-part")
        self._lock = threading.Lock()
        self._open: list[StreamedUpload] = []

    def start(self, key: str, path: Path, batch: int) -> StreamedUpload:
        """The upload of the local file ``path`` (being written) to ``key``; nothing is sent yet."""
        upload = StreamedUpload(self, key, path, batch)
        with self._lock:
            self._open.append(upload)
        return upload

    def submit_part(self, upload: StreamedUpload, number: int, offset: int, length: int) -> Future[bytes]:
        self._slots.acquire()  # back-pressure: the compressor waits while PARTS_IN_FLIGHT are going
        try:
            future = self._pool.submit(upload.send_part, number, offset, length)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def forget(self, upload: StreamedUpload) -> None:
        with self._lock:
            if upload in self._open:
                self._open.remove(upload)

    def close(self) -> None:
        """Abort every upload not completed (a failed or abandoned run), then stop the uploaders."""
        with self._lock:
            still_open, self._open = self._open, []
        for upload in still_open:
            upload.abort()
        self._pool.shutdown(wait=True)


class StreamedUpload:
    """One local file's multipart upload, fed by ``upload_through`` as the file grows."""

    def __init__(self, owner: StreamedUploads, key: str, path: Path, batch: int) -> None:
        self.key = key
        self.path = path
        self.batch = batch
        self._owner = owner
        self._upload_id: str | None = None
        self._sent = 0  # bytes of the file handed to part uploads
        self._parts: list[Future[bytes]] = []
        self._etags: dict[int, str] = {}
        self._digests: list[bytes] = []
        self._failed: BaseException | None = None
        self._size: int | None = None  # set by seal
        self.checksum: str | None = None  # set by finish: the object's checksum, as the manifest lists it

    @property
    def started(self) -> bool:
        return self._upload_id is not None

    @property
    def sent(self) -> int:
        """Bytes of the file handed to part uploads so far."""
        return self._sent

    def wants(self, written: int) -> bool:
        """Whether ``written`` bytes of the file make a part to send (then flush and ``upload_through``)."""
        return self._failed is None and written - self._sent >= self._owner.part_bytes

    def upload_through(self, flushed: int) -> None:
        """The file's first ``flushed`` bytes are on disk: send every whole part among them."""
        part_bytes = self._owner.part_bytes
        while self._failed is None and flushed - self._sent >= part_bytes:
            self._send(part_bytes)

    def seal(self, size: int) -> None:
        """The file is complete at ``size`` bytes: send the rest (when anything was streamed), without
        waiting for it."""
        if self._size is not None:
            raise ValueError(f"{self.key}: sealed twice")
        self._size = size
        if self._upload_id is not None and self._failed is None and size > self._sent:
            self._send(size - self._sent)

    def finish(self) -> str | None:
        """Wait for every part of the sealed file; the object's checksum (as the manifest lists it),
        or None when nothing was streamed (the file never held a whole part) or a part failed (the
        upload is then aborted): either way the file is uploaded whole (``put_data_file``)."""
        if self._size is None:
            raise ValueError(f"{self.key}: finish() before seal()")
        if self._upload_id is None and self._failed is None:
            self._owner.forget(self)
            return None
        for future in self._parts[len(self._digests) :]:
            try:
                self._digests.append(future.result())
            except Exception as exc:  # reported below: the file goes up whole
                self._failed = self._failed or exc
                break
        if self._failed is not None:
            logger.warning(
                "a streamed upload failed: the file is uploaded whole instead",
                extra={"s3_key": self.key, "error": str(self._failed)},
            )
            self.abort()
            return None
        if self._sent != self._size:
            raise ValueError(f"{self.path.name}: {self._sent} bytes were streamed of {self._size}")
        self.checksum = parts_checksum(self._digests)
        return self.checksum

    def complete(self) -> None:
        """Make the object visible (S3 sends its notification now). After ``finish`` returned a checksum."""
        if self.checksum is None or self._upload_id is None:
            raise ValueError(f"{self.key}: complete() needs a finished upload")
        parts = [
            {
                "PartNumber": number,
                "ETag": self._etags[number],
                "ChecksumSHA256": base64.b64encode(digest).decode("ascii"),
            }
            for number, digest in enumerate(self._digests, start=1)
        ]
        try:
            self._owner.s3.complete_multipart_upload(
                Bucket=self._owner.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except (ClientError, BotoCoreError) as exc:
            error = classify_s3_error(exc, s3_key=self.key)
            error.run_id = self._owner.run_id
            raise error from exc
        self._upload_id = None
        self._owner.forget(self)

    def abort(self) -> None:
        """Abandon the upload: nothing of it becomes visible. Waits for parts still going."""
        for future in self._parts:
            future.exception()  # wait; its error, if any, no longer matters
        upload_id, self._upload_id = self._upload_id, None
        self._owner.forget(self)
        if upload_id is None:
            return
        try:
            self._owner.s3.abort_multipart_upload(Bucket=self._owner.bucket, Key=self.key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The bucket's AbortIncompleteMultipartUpload rule removes it later; nothing is visible.
            logger.warning("could not abort a streamed upload", extra={"s3_key": self.key, "error": str(exc)})

    def _send(self, length: int) -> None:
        if self._upload_id is None:
            try:
                self._upload_id = self._create()
            except (ClientError, BotoCoreError) as exc:  # the file goes up whole (finish)
                self._failed = exc
                return
        number = len(self._parts) + 1
        self._parts.append(self._owner.submit_part(self, number, self._sent, length))
        self._sent += length

    def _create(self) -> str:
        owner = self._owner
        response = owner.s3.create_multipart_upload(
            Bucket=owner.bucket,
            Key=self.key,
            ChecksumAlgorithm="SHA256",
            Metadata={META_RUN_ID: owner.run_id, META_BATCH: str(self.batch)},
            **content_headers(self.key),
        )
        return str(response["UploadId"])

    def send_part(self, number: int, offset: int, length: int) -> bytes:
        """Upload part ``number`` (the file's bytes from ``offset``); its SHA-256 digest. Part thread."""
        with self.path.open("rb") as file:
            file.seek(offset)
            body = file.read(length)
        if len(body) != length:
            raise ValueError(f"{self.path.name} holds {offset + len(body)} bytes, {offset + length} expected")
        digest = hashlib.sha256(body).digest()
        response = self._owner.s3.upload_part(
            Bucket=self._owner.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
            ChecksumSHA256=base64.b64encode(digest).decode("ascii"),
        )
        self._etags[number] = str(response["ETag"])
        return digest
