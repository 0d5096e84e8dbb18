"""Staged files uploaded while they are written (``pgsnow.streamed_upload``), against the moto server
over HTTP: nothing is visible before ``complete``, S3's checksum over the parts is the one the
manifest lists, an abandoned or failed upload leaves nothing behind, and the loader's checks
(``staged_checksum``, ``manifest_mismatch``) tell a streamed file from one put under its key."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from stack_support import new_bucket

from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, data_key, parse_data_key
from pgsnow.load.objects import head_staged_object, manifest_mismatch
from pgsnow.local.aws import LocalAws
from pgsnow.manifest import META_BATCH, META_RUN_ID, META_SHA256, RunManifest, RunState, StagedFile
from pgsnow.staging import PARTS_CHECKSUM_PREFIX, parts_checksum, staged_checksum
from pgsnow.streamed_upload import StreamedUploads

pytestmark = pytest.mark.integration

MIB = 1 << 20
PART = 5 * MIB  # S3's smallest part but the last (moto refuses smaller ones too)
RUN_ID = "20261207T120000Z-0a1b2c3d"
TABLE = TableRef("public", "events")


@pytest.fixture(scope="module")
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3, "pgsnow-streamed", versioned=True)


@pytest.fixture
def uploads(s3: Any, bucket: str) -> Any:
    owner = StreamedUploads(s3, bucket, run_id=RUN_ID, part_bytes=PART)
    yield owner
    owner.close()


def key(batch: int = 1) -> str:
    return data_key("staging", TABLE, batch, RUN_ID, FileFormat.CSV)


def grow(path: Path, data: bytes) -> int:
    """Append ``data`` to the local file (as the compressor does); its size after."""
    with path.open("ab") as file:
        file.write(data)
    return path.stat().st_size


def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def listed_keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_file_streamed_as_it_grows_is_invisible_until_completed_and_s3_reports_the_listed_checksum(
    s3: Any, bucket: str, uploads: StreamedUploads, tmp_path: Path
) -> None:
    # Given a file written in pieces, its upload fed as it grows
    path = tmp_path / "batch1.csv.gz"
    upload = uploads.start(key(), path, 1)
    pieces = [os.urandom(3 * MIB) for _ in range(4)] + [os.urandom(1234)]
    for piece in pieces:
        size = grow(path, piece)
        if upload.wants(size):
            upload.upload_through(size)
    # Then whole parts went up while it grew, and nothing of it is visible yet
    assert upload.started and upload.sent == 2 * PART
    assert [u["Key"] for u in open_uploads(s3, bucket)] == [key()]
    assert listed_keys(s3, bucket) == []
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key=key())
    # When it is sealed and finished
    content = path.read_bytes()
    upload.seal(len(content))
    checksum = upload.finish()
    # Then the checksum is S3's over the parts' SHA-256 digests
    parts = [content[:PART], content[PART : 2 * PART], content[2 * PART :]]
    assert checksum == parts_checksum([hashlib.sha256(p).digest() for p in parts])
    assert checksum is not None and checksum.startswith(PARTS_CHECKSUM_PREFIX)
    assert listed_keys(s3, bucket) == []  # finished is not visible either: complete() is
    # When it is completed
    upload.complete()
    # Then the object is the file, carries the run's metadata (no pgsnow-sha256: it was set before
    # the content existed), and S3's checksum reads as the one the manifest lists
    assert listed_keys(s3, bucket) == [key()]
    assert open_uploads(s3, bucket) == []
    assert s3.get_object(Bucket=bucket, Key=key())["Body"].read() == content
    head = s3.head_object(Bucket=bucket, Key=key(), ChecksumMode="ENABLED")
    assert head["Metadata"] == {META_RUN_ID: RUN_ID, META_BATCH: "1"}
    assert head["ContentEncoding"] == "gzip"
    assert staged_checksum(head) == checksum


def test_a_file_smaller_than_a_part_is_not_streamed(
    s3: Any, bucket: str, uploads: StreamedUploads, tmp_path: Path
) -> None:
    path = tmp_path / "batch1.csv.gz"
    upload = uploads.start(key(), path, 1)
    size = grow(path, os.urandom(PART - 1))
    assert not upload.wants(size)
    upload.seal(size)
    # Then there is nothing to complete: the file is uploaded whole, as one that was not streamed
    assert upload.finish() is None and not upload.started
    assert open_uploads(s3, bucket) == [] and listed_keys(s3, bucket) == []


def test_closing_aborts_every_upload_not_completed(
    s3: Any, bucket: str, uploads: StreamedUploads, tmp_path: Path
) -> None:
    # Given a file being streamed, and another finished but not completed (its manifest never written)
    growing = uploads.start(key(1), tmp_path / "a.csv.gz", 1)
    growing.upload_through(grow(tmp_path / "a.csv.gz", os.urandom(PART + 10)))
    finished = uploads.start(key(2), tmp_path / "b.csv.gz", 2)
    size = grow(tmp_path / "b.csv.gz", os.urandom(PART + 20))
    finished.upload_through(size)
    finished.seal(size)
    assert finished.finish() is not None
    assert len(open_uploads(s3, bucket)) == 2
    # When the run ends without completing them (it failed)
    uploads.close()
    # Then nothing is left: no object, no incomplete upload
    assert open_uploads(s3, bucket) == [] and listed_keys(s3, bucket) == []


def test_a_failed_part_abandons_the_upload_and_leaves_the_file_to_go_up_whole(
    s3: Any, bucket: str, uploads: StreamedUploads, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "batch1.csv.gz"
    upload = uploads.start(key(), path, 1)
    upload.upload_through(grow(path, os.urandom(PART)))
    # Given the upload gone from S3 behind its back (its next part is refused: NoSuchUpload)
    (uploading,) = open_uploads(s3, bucket)
    s3.abort_multipart_upload(Bucket=bucket, Key=key(), UploadId=uploading["UploadId"])
    size = grow(path, os.urandom(PART + 5))
    upload.upload_through(size)
    upload.seal(size)
    # Then finishing reports nothing streamed, with a warning naming the key, and leaves nothing open
    with caplog.at_level(logging.WARNING):
        assert upload.finish() is None
    assert any(key() in str(getattr(r, "s3_key", "")) for r in caplog.records)
    assert open_uploads(s3, bucket) == [] and listed_keys(s3, bucket) == []
    with pytest.raises(ValueError, match="needs a finished upload"):
        upload.complete()


def test_an_object_put_by_hand_under_a_streamed_files_key_does_not_match_its_manifest(
    s3: Any, bucket: str, uploads: StreamedUploads, tmp_path: Path
) -> None:
    # Given a streamed file completed and listed in its run's manifest with S3's checksum
    path = tmp_path / "batch1.csv.gz"
    upload = uploads.start(key(), path, 1)
    size = grow(path, os.urandom(PART + 100))
    upload.upload_through(size)
    upload.seal(size)
    checksum = upload.finish()
    assert checksum is not None
    upload.complete()
    listed = StagedFile(key(), 1, 10, size, checksum, FileFormat.CSV)
    manifest = RunManifest(
        run_id=RUN_ID,
        table=TABLE,
        mode="cdc",
        file_format=FileFormat.CSV,
        columns=(),
        primary_key=(),
        state=RunState.STAGED,
        started_at="2026-12-07T12:00:00Z",
        files=(listed,),
    )
    staged = parse_data_key(key(), "staging")
    facts = head_staged_object(s3, bucket, staged)
    # Then the loader's check passes for it
    assert facts is not None and facts.sha256 == checksum
    assert manifest_mismatch(manifest, staged, facts) is None
    # When the same bytes are put under the key by hand, whole (another ETag, no parts)
    s3.put_object(Bucket=bucket, Key=key(), Body=path.read_bytes(), ChecksumAlgorithm="SHA256")
    facts = head_staged_object(s3, bucket, staged)
    # Then it reads as the whole file's SHA-256, not the parts' checksum: refused, naming both
    assert facts is not None and facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    error = manifest_mismatch(manifest, staged, facts)
    assert error is not None and checksum in str(error) and "checksum" in str(error)


def test_the_checksum_of_an_object_uploaded_whole_is_its_sha256_in_hex_and_metadata_comes_first(
    s3: Any, bucket: str
) -> None:
    body = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="a", Body=body, ChecksumAlgorithm="SHA256")
    head = s3.head_object(Bucket=bucket, Key="a", ChecksumMode="ENABLED")
    assert staged_checksum(head) == hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key="b", Body=body, Metadata={META_SHA256: "f" * 64})
    head = s3.head_object(Bucket=bucket, Key="b", ChecksumMode="ENABLED")
    assert staged_checksum(head) == "f" * 64
    s3.put_object(Bucket=bucket, Key="c", Body=body, ChecksumAlgorithm="CRC32")
    head = s3.head_object(Bucket=bucket, Key="c", ChecksumMode="ENABLED")
    assert staged_checksum(head) is None
