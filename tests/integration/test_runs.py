"""The run store against the local moto server: conditional writes, listing in run order, errors
that name the key, and the extraction lease's conditional protocol."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from pgsnow.checkpoint import LeaseLostError, RunInProgressError
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.keys import FileFormat, manifest_key
from pgsnow.local.aws import LocalAws
from pgsnow.manifest import RunManifest, RunState
from pgsnow.runs import ManifestNotFoundError, RunStore

pytestmark = pytest.mark.integration

ORDERS = TableRef("public", "orders")
# A table whose name extends ``orders``: its manifests must never show up under ``orders``.
ORDERS_ARCHIVE = TableRef("public", "orders_archive")
OTHER_SCHEMA = TableRef("sales", "orders")
RUNS = ["20261125T120000000000Z", "20261126T120000000000Z", "20261127T120000000000Z"]


@pytest.fixture
def s3(aws: LocalAws) -> Any:
    return aws.client("s3")


@pytest.fixture(params=[False, True], ids=["unversioned", "versioned"])
def store(request: pytest.FixtureRequest, s3: Any) -> RunStore:
    """A run store over a fresh bucket, versioned or not."""
    bucket = f"pgsnow-runs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    if request.param:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return RunStore(s3, bucket)


def manifest(table: TableRef, run_id: str, state: RunState = RunState.STAGED) -> RunManifest:
    return RunManifest(
        run_id=run_id,
        table=table,
        mode="full",
        file_format=FileFormat.CSV,
        columns=(),
        primary_key=("id",),
        state=state,
        started_at="2026-11-25T12:00:00Z",
    )


# --------------------------------------------------------------------------- manifests


def test_written_manifest_reads_back_with_what_a_rewrite_needs(store: RunStore, s3: Any) -> None:
    written = manifest(ORDERS, RUNS[0])
    key = store.put_manifest(written)

    found = store.read_manifest_for_update(ORDERS, RUNS[0])

    assert key == manifest_key(ORDERS, RUNS[0]) == f"_pgsnow/manifests/public/orders/{RUNS[0]}.json"
    assert found is not None
    assert found.manifest == written == store.get_manifest(ORDERS, RUNS[0])
    head = s3.head_object(Bucket=store.bucket, Key=key)
    assert (found.etag, head["ContentType"]) == (head["ETag"], "application/json")
    versioned = s3.get_bucket_versioning(Bucket=store.bucket).get("Status") == "Enabled"
    assert (found.version_id is not None) is versioned
    assert found.last_modified is not None


def test_missing_manifest_error_names_its_key(store: RunStore) -> None:
    with pytest.raises(ManifestNotFoundError) as raised:
        store.get_manifest(ORDERS, RUNS[0])

    assert raised.value.s3_key == manifest_key(ORDERS, RUNS[0])
    assert (raised.value.table, raised.value.run_id) == (ORDERS.qualified, RUNS[0])
    assert store.read_manifest_for_update(ORDERS, RUNS[0]) is None


def test_rewrite_from_a_stale_read_loses_and_leaves_the_newer_manifest(store: RunStore) -> None:
    # Given two readers of the same manifest
    store.put_manifest(manifest(ORDERS, RUNS[0]))
    first = store.read_manifest_for_update(ORDERS, RUNS[0])
    second = store.read_manifest_for_update(ORDERS, RUNS[0])
    assert first is not None and second is not None
    # When the first rewrites it, then the second rewrites from its (now stale) copy
    loaded = first.manifest.with_state(RunState.LOADED)
    claimed = second.manifest.with_state(RunState.STAGED, cleaned=("a-key",))
    assert store.write_manifest_if_unchanged(first, loaded) is True
    # Then the second write is refused and the first one stays
    assert store.write_manifest_if_unchanged(second, claimed) is False
    assert store.get_manifest(ORDERS, RUNS[0]) == loaded


def test_of_two_concurrent_rewrites_exactly_one_wins(store: RunStore) -> None:
    store.put_manifest(manifest(ORDERS, RUNS[0]))
    base = store.read_manifest_for_update(ORDERS, RUNS[0])
    assert base is not None
    rewrites = [base.manifest.with_state(RunState.LOADED, cleaned=(f"key-{n}",)) for n in range(2)]
    start = threading.Barrier(len(rewrites))
    outcomes: dict[int, bool] = {}

    def rewrite(n: int) -> None:
        start.wait()
        outcomes[n] = store.write_manifest_if_unchanged(base, rewrites[n])

    threads = [threading.Thread(target=rewrite, args=(n,)) for n in range(len(rewrites))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [n for n, won in outcomes.items() if won]
    assert len(winners) == 1, outcomes
    assert store.get_manifest(ORDERS, RUNS[0]) == rewrites[winners[0]]


def test_manifests_are_listed_in_run_order_per_table(store: RunStore) -> None:
    # Given runs written out of order, and tables whose folders share a prefix with ``orders``
    for run_id in (RUNS[2], RUNS[0], RUNS[1]):
        store.put_manifest(manifest(ORDERS, run_id))
    store.put_manifest(manifest(ORDERS_ARCHIVE, RUNS[1]))
    store.put_manifest(manifest(OTHER_SCHEMA, RUNS[0]))

    assert store.run_ids(ORDERS) == RUNS
    assert [m.run_id for m in store.manifests_newest_first(ORDERS)] == RUNS[::-1]
    assert [m.run_id for m in store.iter_manifests([ORDERS])] == RUNS
    assert [(m.table, m.run_id) for m in store.iter_manifests()] == [
        *((ORDERS, run_id) for run_id in RUNS),
        (ORDERS_ARCHIVE, RUNS[1]),
        (OTHER_SCHEMA, RUNS[0]),
    ]
    assert store.tables_with_manifests() == [ORDERS, ORDERS_ARCHIVE, OTHER_SCHEMA]
    assert store.run_ids(TableRef("public", "never_run")) == []
    # Listed from a run on: only the later runs (of this table only), whether or not that run has
    # a manifest
    assert store.run_ids(ORDERS, after=RUNS[0]) == RUNS[1:]
    assert store.run_ids(ORDERS, after=RUNS[-1]) == []
    assert store.run_ids(ORDERS, after="20000101T000000000000Z") == RUNS


def test_a_failed_read_other_than_missing_names_the_key(s3: Any) -> None:
    store = RunStore(s3, f"pgsnow-nowhere-{uuid.uuid4().hex[:8]}")

    with pytest.raises(PermanentError) as raised:
        store.get_manifest(ORDERS, RUNS[0])

    assert not isinstance(raised.value, ManifestNotFoundError)
    assert raised.value.s3_key == manifest_key(ORDERS, RUNS[0])
    assert "NoSuchBucket" in raised.value.message


# --------------------------------------------------------------------------- the lease


def test_lease_is_held_by_one_run_and_a_stale_holder_cannot_rewrite_it(store: RunStore) -> None:
    # Given a run holding the table's lease
    lease = store.acquire_lease(ORDERS, run_id=RUNS[0], owner="first", ttl_s=60, resume=False)
    # When another run asks for it, it is refused
    with pytest.raises(RunInProgressError) as refused:
        store.acquire_lease(ORDERS, run_id=RUNS[1], owner="second", ttl_s=60, resume=False)
    assert refused.value.run_id == RUNS[0]
    # When the holder hands it off, a resuming invocation takes it over
    handed_off = store.hand_off_lease(lease, ttl_s=60)
    taken = store.acquire_lease(ORDERS, run_id=RUNS[1], owner="second", ttl_s=60, resume=True)
    assert (taken.run_id, taken.owner) == (RUNS[0], "second")
    # Then the previous holder's copy is stale: renewing it fails, releasing it leaves the lease
    with pytest.raises(LeaseLostError):
        store.renew_lease(handed_off, ttl_s=60)
    store.release_lease(handed_off)
    assert store.current_lease(ORDERS) == taken
    store.release_lease(taken)
    assert store.current_lease(ORDERS) is None
