"""A loopback proxy in front of the Firestore emulator that counts the RPCs passing through it.

Usage: rpc_counter.py UPSTREAM_HOST:PORT

It prints its own address (``127.0.0.1:PORT``) on the first line of stdout.
For each line on stdin it prints one line:

- ``count``: the number of RPCs forwarded so far;
- ``methods``: a JSON object with the RPCs so far by kind (``commit``,
  ``batch_get``, ``query`` and ``other``), the documents that the batch gets
  asked for (``documents_read``) and the writes that the commits carried
  (``writes``);
- ``latency SECONDS``: ``ok``, after which the first frame of each reply is
  held for SECONDS, as a network round trip would delay it (0 ends that).

It exits at the end of stdin. The proxy is tests/tcp_proxy.py, which counts
one RPC per HTTP/2 stream that a client opens. The kind of an RPC comes from
the protobuf message in the first DATA frame of its stream, because the
method name travels HPACK-compressed in the headers. It runs in a process of
its own so that its forwarding threads do not compete for the GIL with the
benchmark's clients.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tcp_proxy import TcpProxy  # found through the path set above

_DATA_FRAME = 0x0
_PADDED_FLAG = 0x8
# The gRPC message prefix: a compression flag and a 4-byte length.
_GRPC_PREFIX_LENGTH = 5
_LENGTH_DELIMITED = 2
_DOCUMENT_NAME_PREFIX = b"projects/"


class CountingProxy(TcpProxy):
    """A TcpProxy that also sorts the RPCs by kind and counts documents read and written."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.kinds: Counter[str] = Counter()
        self.documents_read = 0
        self.writes = 0
        self._kinds_lock = threading.Lock()

    def _forward_request_frame(self, connection: Any, frame: bytes) -> None:
        frame_type, flags, stream = frame[3], frame[4], int.from_bytes(frame[5:9], "big")
        stream &= 0x7FFFFFFF
        if frame_type == _DATA_FRAME and stream:
            # Only this connection's request thread reads or changes its set.
            classified: set[int] = connection.__dict__.setdefault("classified_streams", set())
            if stream not in classified:
                classified.add(stream)
                self._classify_first_message(flags, frame[9:])
        super()._forward_request_frame(connection, frame)

    def _classify_first_message(self, flags: int, payload: bytes) -> None:
        if flags & _PADDED_FLAG and payload:
            padding = payload[0]
            payload = payload[1 : len(payload) - padding]
        message = payload[_GRPC_PREFIX_LENGTH:]
        kind, documents, writes = classify_request(message)
        with self._kinds_lock:
            self.kinds[kind] += 1
            self.documents_read += documents
            self.writes += writes

    def methods(self) -> dict[str, Any]:
        """Return the RPCs so far by kind, with the documents read and the writes."""
        with self._kinds_lock:
            return {
                **{
                    kind: self.kinds.get(kind, 0)
                    for kind in ("commit", "batch_get", "query", "other")
                },
                "documents_read": self.documents_read,
                "writes": self.writes,
            }


def classify_request(message: bytes) -> tuple[str, int, int]:
    """Return the kind of a Firestore request message, the documents it reads and its writes.

    A CommitRequest and a BatchGetDocumentsRequest both start with the
    database name (field 1), followed by repeated field 2: the writes of a
    commit, each a message that contains a document name, or the document
    names of a batch get. A RunQueryRequest starts with a parent path under
    ``/documents``. Anything else (BeginTransaction, Rollback) is ``other``.
    A message cut short by the end of the frame is sorted by the fields that
    the frame holds.
    """
    fields = _length_delimited_fields(message)
    if not fields or fields[0][0] != 1:
        return "other", 0, 0
    if b"/documents" in fields[0][1]:
        return "query", 0, 0

    entries = [value for number, value in fields if number == 2]
    if not entries:
        return "other", 0, 0
    if all(entry.startswith(_DOCUMENT_NAME_PREFIX) for entry in entries):
        return "batch_get", len(entries), 0
    if all(_is_write(entry) for entry in entries):
        return "commit", 0, len(entries)
    return "other", 0, 0


def _is_write(entry: bytes) -> bool:
    """Return whether ``entry`` looks like a Write: its first field names a document.

    The first field of a Write is ``update`` (a Document whose field 1 is its
    name), ``delete`` (the name itself) or ``transform`` (a DocumentTransform
    whose field 1 is the name).
    """
    fields = _length_delimited_fields(entry, limit=1)
    if not fields:
        return False
    _, value = fields[0]
    if value.startswith(_DOCUMENT_NAME_PREFIX):
        return True
    inner = _length_delimited_fields(value, limit=1)
    return bool(inner) and inner[0][0] == 1 and inner[0][1].startswith(_DOCUMENT_NAME_PREFIX)


def _length_delimited_fields(data: bytes, limit: int | None = None) -> list[tuple[int, bytes]]:
    """Return the length-delimited fields of a protobuf message, in order, as (number, bytes).

    Varint and fixed-width fields are skipped. Parsing stops at the first field
    that does not fit in ``data``, or after ``limit`` length-delimited fields.
    """
    fields: list[tuple[int, bytes]] = []
    position = 0
    while position < len(data) and (limit is None or len(fields) < limit):
        key, position = _varint(data, position)
        if key is None:
            break
        number, wire_type = key >> 3, key & 0x7
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(data, position)
            if length is None or position + length > len(data):
                break
            fields.append((number, data[position : position + length]))
            position += length
        else:
            break
    return fields


def _varint(data: bytes, position: int) -> tuple[int | None, int]:
    value = 0
    shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None, position


def main(upstream: str) -> int:
    proxy = CountingProxy(upstream)
    with proxy:
        print(proxy.address, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "count":
                print(proxy.requests, flush=True)
            elif command == "methods":
                print(json.dumps(proxy.methods()), flush=True)
            elif command.startswith("latency "):
                proxy.reply_latency(float(command.split()[1]))
                print("ok", flush=True)
            else:
                print(f"unknown command {command!r}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: rpc_counter.py UPSTREAM_HOST:PORT", file=sys.stderr)
        sys.exit(64)
    sys.exit(main(sys.argv[1]))
