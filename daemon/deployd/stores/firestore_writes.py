"""Write messages for the store's grants, renewals and releases, built as plain protobuf.

google-cloud-firestore 2.34 builds every field value of a write as a
proto-plus message (``DocumentExtractor`` in ``firestore_v1._helpers``).
Building the two writes of a grant that way took about 0.46 ms of CPU, and
about 0.1 to 0.14 ms here (timeit, on the 2-core VM that docs/benchmarks.md
describes). The functions here build the same ``Write`` messages with the
protobuf classes. They take the values that the store writes: None, bool,
int, float, str, datetime, dicts of these, and the sentinels
SERVER_TIMESTAMP and Increment at any depth. Field names must be plain
identifiers. Anything else raises ValueError or TypeError, so a write that
these functions cannot build exactly is never sent in another form.
commit_request() builds the request of a commit around such writes, and
parse_update_time() reads the update time of a precondition.
tests/test_firestore_writes.py compares each write and request with the library's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.cloud.firestore import SERVER_TIMESTAMP, Increment
from google.cloud.firestore_v1.types import common, document, firestore, write
from google.protobuf import timestamp_pb2  # type: ignore[import-untyped]

_CommitRequest = firestore.CommitRequest.pb()
_Write = write.Write.pb()
_Document = document.Document.pb()
_Value = document.Value.pb()
_MapValue = document.MapValue.pb()
_FieldTransform = write.DocumentTransform.FieldTransform.pb()
_Timestamp = timestamp_pb2.Timestamp
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_REQUEST_TIME = write.DocumentTransform.FieldTransform.ServerValue.REQUEST_TIME


class _Parts:
    """The fields of a write split into stored values, transforms and leaf field paths."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.values: dict[str, Any] = {}
        # (path parts, transform) pairs, and the paths of the stored leaves.
        self.transforms: list[tuple[tuple[str, ...], Any]] = []
        self.leaves: list[tuple[str, ...]] = []
        self._split(fields, (), self.values)

    def _split(
        self, fields: Mapping[str, Any], prefix: tuple[str, ...], into: dict[str, Any]
    ) -> None:
        for name, value in fields.items():
            # The names that need no quoting in a field path: [_a-zA-Z][_a-zA-Z0-9]*
            if not isinstance(name, str) or not (name.isascii() and name.isidentifier()):
                raise ValueError(
                    f"field name {name!r} is not a plain identifier; write such fields "
                    "with the library's batch methods"
                )
            path = (*prefix, name)
            if value is SERVER_TIMESTAMP:
                self.transforms.append(
                    (
                        path,
                        _FieldTransform(
                            field_path=".".join(path), set_to_server_value=_REQUEST_TIME
                        ),
                    )
                )
            elif isinstance(value, Increment):
                transform = _FieldTransform(
                    field_path=".".join(path), increment=encode_value(value.value)
                )
                self.transforms.append((path, transform))
            elif isinstance(value, dict) and value:
                nested: dict[str, Any] = {}
                self._split(value, path, nested)
                # Like the library, a map whose every field is a transform is not stored.
                if nested:
                    into[name] = _Value(map_value=_MapValue(fields=nested))
            else:
                into[name] = encode_value(value)
                self.leaves.append(path)

    def sorted_transforms(self) -> list[Any]:
        return [transform for _, transform in sorted(self.transforms, key=lambda item: item[0])]


def encode_value(value: Any) -> Any:
    """Return ``value`` as a protobuf ``Value``, as the library encodes it."""
    if value is None:
        return _Value(null_value=0)
    # bool first, because it is a subclass of int.
    if isinstance(value, bool):
        return _Value(boolean_value=value)
    if isinstance(value, int):
        return _Value(integer_value=value)
    if isinstance(value, float):
        return _Value(double_value=value)
    if isinstance(value, str):
        return _Value(string_value=value)
    if isinstance(value, datetime):
        encoded = _Value()
        # A DatetimeWithNanoseconds keeps its nanoseconds. A naive datetime is
        # taken as UTC, as the library takes it.
        timestamp_pb = getattr(value, "timestamp_pb", None)
        if timestamp_pb is not None:
            encoded.timestamp_value.CopyFrom(timestamp_pb())
        else:
            encoded.timestamp_value.FromDatetime(value)
        return encoded
    if isinstance(value, dict):
        parts = _Parts(value)
        if parts.transforms:
            raise ValueError(
                "a transform inside a map value is only valid in a field of a write; "
                "pass the map as a field"
            )
        return _Value(map_value=_MapValue(fields=parts.values))
    raise TypeError(
        f"cannot encode a value of type {type(value).__name__}: this module takes None, "
        "bool, int, float, str, datetime and dict; write it with the library's batch methods"
    )


def update_write(path: str, fields: Mapping[str, Any], update_time: str | None) -> write.Write:
    """Return the write of ``DocumentReference.update(fields)`` on the document ``path``.

    The precondition is ``update_time`` (RFC 3339) when given, else that the
    document exists, as the library's default.
    """
    parts = _Parts(fields)
    transformed = {path_parts[0] for path_parts, _ in parts.transforms if len(path_parts) == 1}
    message = _Write(
        update=_Document(name=path, fields=parts.values),
        update_transforms=parts.sorted_transforms(),
    )
    message.update_mask.field_paths.extend(
        sorted(name for name in fields if name not in transformed)
    )
    if update_time is not None:
        message.current_document.update_time.CopyFrom(parse_update_time(update_time))
    else:
        message.current_document.exists = True
    return _wrap(message)


def create_write(path: str, fields: Mapping[str, Any]) -> write.Write:
    """Return the write of ``DocumentReference.create(fields)`` on the document ``path``."""
    parts = _Parts(fields)
    message = _Write(
        update=_Document(name=path, fields=parts.values),
        update_transforms=parts.sorted_transforms(),
        current_document=common.Precondition.pb()(exists=False),
    )
    return _wrap(message)


def merge_write(path: str, fields: Mapping[str, Any]) -> write.Write:
    """Return the write of ``DocumentReference.set(fields, merge=True)`` on document ``path``."""
    parts = _Parts(fields)
    message = _Write(
        update=_Document(name=path, fields=parts.values),
        update_transforms=parts.sorted_transforms(),
    )
    message.update_mask.field_paths.extend(".".join(leaf) for leaf in sorted(parts.leaves))
    return _wrap(message)


def absent_write(path: str) -> write.Write:
    """Return a delete of document ``path`` on the precondition that it does not exist.

    It changes nothing. In a batch it makes the commit fail with AlreadyExists
    when the document exists, so a commit can depend on a document's absence.
    """
    message = _Write(delete=path, current_document=common.Precondition.pb()(exists=False))
    return _wrap(message)


def parse_update_time(text: str) -> timestamp_pb2.Timestamp:
    """Return an update time in RFC 3339 form as a protobuf Timestamp.

    The store's versions have the fixed form YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ
    (firestore_documents.version_of), which the datetime module reads in C.
    Any other form goes to Timestamp.FromJsonString, which takes every
    RFC 3339 form but runs strptime in Python: about 6.6 µs against 2.2 to
    2.6 µs here (timeit, on the 2-core VM of docs/benchmarks.md). The separators are
    checked first, because datetime.fromisoformat also takes ISO 8601 forms
    that RFC 3339 does not, such as week dates.
    """
    if (
        len(text) == 30
        and text.isascii()
        and text[4] == text[7] == "-"
        and text[10] == "T"
        and text[13] == text[16] == ":"
        and text[19] == "."
        and text[29] == "Z"
    ):
        fraction = text[20:29]
        try:
            moment = datetime.fromisoformat(text[:19]).replace(tzinfo=UTC)
        except ValueError:
            pass
        else:
            if fraction.isdigit():
                return _Timestamp(seconds=(moment - _EPOCH) // _SECOND, nanos=int(fraction))
    timestamp = _Timestamp()
    timestamp.FromJsonString(text)
    return timestamp


def commit_request(database: str, writes: Sequence[write.Write]) -> firestore.CommitRequest:
    """Return the request of a commit of ``writes`` in ``database``, outside a transaction.

    A library batch passes its writes to the request in a dict, and proto-plus
    converts them one by one before every commit. Here they go into one
    protobuf message, and the request wraps it without a copy.
    """
    message = _CommitRequest(database=database, writes=[write.Write.pb(each) for each in writes])
    request: firestore.CommitRequest = firestore.CommitRequest.wrap(message)
    return request


def _wrap(message: Any) -> write.Write:
    """Return the proto-plus Write around ``message``, without copying it, as batches hold them."""
    wrapped: write.Write = write.Write.wrap(message)
    return wrapped
