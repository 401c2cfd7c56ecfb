"""Tests that the store's hand-built Write messages equal those of google-cloud-firestore.

firestore_writes builds the writes of grants, renewals and releases without
the library's proto-plus encoding. Each case here builds one write both ways,
from the fields that the store sends, and compares the protobuf messages.
No emulator is needed: nothing is sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore import DELETE_FIELD, SERVER_TIMESTAMP, AsyncClient, Increment
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.types import firestore, write
from google.protobuf import timestamp_pb2

from deployd.models import LeaseRequest, Outcome, OutcomeStatus, Owner, Purpose, Takeover
from deployd.stores.firestore_documents import (
    finished_record_fields,
    forced_fields,
    lease_fields,
    new_record_fields,
    owner_fields,
    purpose_fields,
    released_fields,
    renewal_fields,
    replaced_record_fields,
)
from deployd.stores.firestore_writes import (
    absent_write,
    commit_request,
    create_write,
    encode_value,
    merge_write,
    parse_update_time,
    update_write,
)

VERSION = "2026-03-01T12:00:00.123456789Z"

REQUEST = LeaseRequest(
    lock="web",
    holder="ana@host_20260301T120000Z_abc123",
    acquisition_id="0123456789abcdef",
    owner=Owner("ana", "host", 4242, "daemon-1"),
    purpose=Purpose(commit="abc123", reason=None),
    ttl=30.0,
    force_reason="stuck deploy",
    waited=1.5,
)
DEGRADED = LeaseRequest(
    lock="web",
    holder="ben@host_20260301T120000Z_def456",
    acquisition_id="fedcba9876543210",
    owner=Owner("ben", "host", None, "daemon-2"),
    purpose=Purpose(commit=None, reason="hotfix"),
    ttl=45.5,
    unlocked_since=1772366400.25,
)


@pytest.fixture(scope="module")
def document_path(monkeypatch_module: pytest.MonkeyPatch) -> str:
    # The emulator host only spares the client a credentials lookup: nothing is sent.
    monkeypatch_module.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:9")
    client = AsyncClient(project="deployd-test")
    path: str = client.document("deployd/default/locks/web")._document_path
    return path


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def library_update(path: str, fields: dict[str, Any], version: str | None) -> Any:
    option = _helpers.LastUpdateOption(version) if version is not None else None
    return _helpers.pbs_for_update(path, fields, option)[0]


def same_message(ours: write.Write, library: write.Write) -> bool:
    return bool(write.Write.pb(ours) == write.Write.pb(library))


UPDATES: list[tuple[str, Callable[[], dict[str, Any]], str | None]] = [
    ("grant", lambda: {**lease_fields(REQUEST), "token": Increment(1)}, VERSION),
    (
        "forced grant",
        lambda: {
            **lease_fields(REQUEST),
            **forced_fields("ben@host", "stuck deploy", 8, "force-1"),
            "token": Increment(1),
        },
        VERSION,
    ),
    ("renewal", lambda: renewal_fields(30.0, "renewal-1"), VERSION),
    ("release", released_fields, VERSION),
    ("without a version", lambda: renewal_fields(12.5, "renewal-2"), None),
    ("map of transforms only", lambda: {"forced": {"at": SERVER_TIMESTAMP}, "empty": {}}, VERSION),
]


@pytest.mark.parametrize(
    ("fields", "version"), [case[1:] for case in UPDATES], ids=[case[0] for case in UPDATES]
)
def test_update_write_equals_library(
    document_path: str, fields: Callable[[], dict[str, Any]], version: str | None
) -> None:
    ours = update_write(document_path, fields(), version)
    assert same_message(ours, library_update(document_path, fields(), version))


CREATES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("lock document", lambda: {**lease_fields(REQUEST), "token": 1}),
    ("record", lambda: new_record_fields(REQUEST, 7, Takeover.FREE)),
    (
        "degraded record",
        lambda: new_record_fields(DEGRADED, 8, Takeover.EXPIRED, "passed a freeze"),
    ),
]


@pytest.mark.parametrize("fields", [case[1] for case in CREATES], ids=[case[0] for case in CREATES])
def test_create_write_equals_library(
    document_path: str, fields: Callable[[], dict[str, Any]]
) -> None:
    ours = create_write(document_path, fields())
    assert same_message(ours, _helpers.pbs_for_create(document_path, fields())[0])


MERGES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    (
        "finished record",
        lambda: finished_record_fields(
            Outcome(OutcomeStatus.FAILED, 2, "abc123", "exit 2"), REQUEST.holder, "release-1"
        ),
    ),
    (
        "finished without detail",
        lambda: finished_record_fields(Outcome(OutcomeStatus.RELEASED), REQUEST.holder, None),
    ),
    ("forced away", lambda: replaced_record_fields(REQUEST, Takeover.FORCED)),
    ("expired", lambda: replaced_record_fields(DEGRADED, Takeover.EXPIRED)),
    ("nested maps", lambda: {"a": {"b": 1, "c": {"d": None}}, "e": {}, "f": SERVER_TIMESTAMP}),
]


@pytest.mark.parametrize("fields", [case[1] for case in MERGES], ids=[case[0] for case in MERGES])
def test_merge_write_equals_library(
    document_path: str, fields: Callable[[], dict[str, Any]]
) -> None:
    ours = merge_write(document_path, fields())
    library = _helpers.pbs_for_set_with_merge(document_path, fields(), True)[0]
    assert same_message(ours, library)


def test_absent_write_equals_library_delete_on_absence(document_path: str) -> None:
    library = _helpers.pb_for_delete(document_path, _helpers.ExistsOption(exists=False))
    assert same_message(absent_write(document_path), library)


VALUES: list[tuple[str, Any]] = [
    ("none", None),
    ("true", True),
    ("zero", 0),
    ("negative", -5),
    ("float", 2.5),
    ("string", "żółw"),
    ("aware datetime", datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=UTC)),
    ("naive datetime", datetime(2026, 3, 1, 12, 0, 0, 654321)),
    (
        "nanoseconds",
        DatetimeWithNanoseconds(2026, 3, 1, 12, 0, 0, nanosecond=123456789, tzinfo=UTC),
    ),
    ("nested map", {"user": "ana", "pid": None, "inner": {"ok": False}}),
    ("empty map", {}),
]


@pytest.mark.parametrize("value", [case[1] for case in VALUES], ids=[case[0] for case in VALUES])
def test_encode_value_equals_library(value: Any) -> None:
    ours = encode_value(value)
    library = _helpers.encode_value(value)
    assert ours == type(library).pb(library)


# Update times as the store writes them (version_of), and other RFC 3339 forms.
UPDATE_TIMES = [
    VERSION,
    "1970-01-01T00:00:00.000000000Z",
    "2028-02-29T23:59:59.999999999Z",
    "2026-03-01T12:00:00Z",
    "2026-03-01T12:00:00.5Z",
    "2026-03-01T13:00:00.123456+01:00",
]


@pytest.mark.parametrize("text", UPDATE_TIMES)
def test_parse_update_time_equals_protobuf(text: str) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromJsonString(text)
    assert parse_update_time(text) == expected


@pytest.mark.parametrize("text", UPDATE_TIMES)
def test_update_write_precondition_equals_library(document_path: str, text: str) -> None:
    fields = renewal_fields(30.0, "renewal-1")
    assert same_message(
        update_write(document_path, fields, text), library_update(document_path, fields, text)
    )


@pytest.mark.parametrize(
    "text",
    [
        "2026-13-01T12:00:00.123456789Z",
        "2026-03-01T12:00:00.12345678xZ",
        "2026-03-01 12:00:00.123456789Z",
        "2026-W09-7T12:00:00.123456789Z",
        "2026-060T12:00:00.123456789Zabc",
        "yesterday",
    ],
)
def test_malformed_update_time_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_update_time(text)


def test_commit_request_equals_library(document_path: str) -> None:
    database = document_path.partition("/documents/")[0]
    writes = [
        update_write(document_path, renewal_fields(30.0, "renewal-1"), VERSION),
        create_write(document_path, new_record_fields(REQUEST, 7, Takeover.FREE)),
        absent_write(document_path),
    ]
    # What AsyncWriteBatch.commit() sends, built from its request dict by proto-plus.
    library = firestore.CommitRequest({"database": database, "writes": writes, "transaction": None})
    ours = commit_request(database, writes)
    assert firestore.CommitRequest.pb(ours) == firestore.CommitRequest.pb(library)


@pytest.mark.parametrize("request_", [REQUEST, DEGRADED], ids=["with pid", "without pid"])
def test_owner_and_purpose_fields_equal_asdict(request_: LeaseRequest) -> None:
    assert owner_fields(request_.owner) == dataclasses.asdict(request_.owner)
    assert purpose_fields(request_.purpose) == dataclasses.asdict(request_.purpose)


def test_delete_field_is_rejected(document_path: str) -> None:
    with pytest.raises(TypeError, match="Sentinel"):
        update_write(document_path, {"waiters": DELETE_FIELD}, VERSION)


def test_dotted_field_name_is_rejected(document_path: str) -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        update_write(document_path, {"waiters.ana": 1}, VERSION)


def test_non_ascii_field_name_is_rejected(document_path: str) -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        update_write(document_path, {"żółw": 1}, VERSION)


def test_unsupported_value_is_rejected(document_path: str) -> None:
    with pytest.raises(TypeError, match="bytes"):
        create_write(document_path, {"blob": b"\x00"})


def test_transform_inside_map_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="transform"):
        encode_value({"at": SERVER_TIMESTAMP})
