"""``staged_checksum`` on HEAD answers as Amazon S3 documents them (moto's differ; the integration
test test_streamed_upload.py covers moto's): a multipart object's composite SHA-256 carries a
``-<parts>`` suffix, an object uploaded whole its SHA-256 in base64."""

from __future__ import annotations

import base64
import hashlib

from pgsnow.manifest import META_SHA256
from pgsnow.staging import PARTS_CHECKSUM_PREFIX, parts_checksum, staged_checksum


def test_a_multipart_objects_composite_checksum_reads_without_its_part_count() -> None:
    digests = [hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()]
    composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    head = {"ETag": '"9b2cf535f27731c974343645a3985328-2"', "ChecksumSHA256": f"{composite}-2"}
    assert staged_checksum(head) == parts_checksum(digests) == PARTS_CHECKSUM_PREFIX + composite


def test_an_object_uploaded_whole_reads_as_its_sha256_in_hex() -> None:
    digest = hashlib.sha256(b"rows").digest()
    head = {"ETag": '"0d599f0ec05c3bda8c3b8a68c32a1b47"', "ChecksumSHA256": base64.b64encode(digest).decode()}
    assert staged_checksum(head) == digest.hex()


def test_the_extractors_metadata_wins_and_nothing_reads_as_none() -> None:
    head = {"Metadata": {META_SHA256.upper(): "ab" * 32}, "ChecksumSHA256": "x", "ETag": '"e-2"'}
    assert staged_checksum(head) == "ab" * 32
    assert staged_checksum({"ETag": '"e"', "Metadata": {}}) is None
    assert staged_checksum({"ETag": '"e"', "ChecksumSHA256": "not base64!"}) is None
