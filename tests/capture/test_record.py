import dataclasses
import json
import struct

import pytest

from headrace.capture.record import (
    FORMAT_VERSION,
    CaptureRecord,
    RecordFormatError,
    encode_record,
)


def _record(**changes: object) -> CaptureRecord:
    record = CaptureRecord(
        request_id="r-1",
        model="sales_forecast",
        version="1",
        received_ns=1_700_000_000_000_000_000,
        responded_ns=1_700_000_000_001_000_000,
        latency_ns=1_000_000,
        status_code=0,
        status_message="",
        request=b"\x0a\x03abc",
        response=b"\x12\x01x",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        batch_id="b-7",
        batch_size=4,
        endpoint="127.0.0.1:8001",
        identity="forecaster",
        headers={"x-tenant": "acme"},
        parameters={"priority": 1, "sampled": True, "note": "n", "ratio": 0.5},
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _format_1(record: CaptureRecord) -> bytes:
    """The entry Headrace wrote before format 2 (its encoder, verbatim): a header, JSON
    metadata, the request and response bytes."""
    metadata = json.dumps(
        {
            "request_id": record.request_id,
            "model": record.model,
            "version": record.version,
            "received_ns": record.received_ns,
            "responded_ns": record.responded_ns,
            "latency_ns": record.latency_ns,
            "status_code": record.status_code,
            "status_message": record.status_message,
            "trace_id": record.trace_id,
            "span_id": record.span_id,
            "batch_id": record.batch_id,
            "batch_size": record.batch_size,
            "endpoint": record.endpoint,
            "identity": record.identity,
            "headers": record.headers,
            "parameters": record.parameters,
            "truncated": record.truncated,
        },
        separators=(",", ":"),
    ).encode()
    header = struct.pack("<BIII", 1, len(metadata), len(record.request), len(record.response))
    return b"".join((header, metadata, record.request, record.response))


@pytest.mark.parametrize(
    "record",
    [
        _record(),
        _record(headers={}, parameters={}, trace_id="", span_id="", identity=""),
        _record(status_code=14, status_message="späť: 服务 unavailable", response=b""),
        _record(request=b"", response=b"", truncated=True, batch_size=0, endpoint=""),
        _record(request=bytes(range(256)) * 300, headers={"x-ü": '\x00 quoted " text'}),
    ],
)
def test_round_trip(record: CaptureRecord) -> None:
    data = record.encode()
    assert data[0] == FORMAT_VERSION
    assert CaptureRecord.decode(data) == record
    assert CaptureRecord.decode(memoryview(data)) == record


def test_encode_record_is_the_records_encoding() -> None:
    record = _record()
    fields = [getattr(record, field.name) for field in dataclasses.fields(record)]
    assert encode_record(*fields) == record.encode()


def test_metadata_is_not_json_and_empty_maps_take_no_bytes() -> None:
    bare = _record(headers={}, parameters={}).encode()
    assert b"{" not in bare
    assert len(bare) == len(_record().encode()) - len(b'{"x-tenant":"acme"}') - len(
        json.dumps(_record().parameters, separators=(",", ":"))
    )


@pytest.mark.parametrize(
    "record", [_record(), _record(truncated=True, request=b"", response=b"", headers={})]
)
def test_format_1_entries_of_an_older_spool_still_decode(record: CaptureRecord) -> None:
    data = _format_1(record)
    assert CaptureRecord.decode(data) == record
    assert CaptureRecord.decode(memoryview(data)) == record


@pytest.mark.parametrize("encode", [CaptureRecord.encode, _format_1])
@pytest.mark.parametrize("cut", [0, 1, 5, 20, 60, -1])
def test_torn_entry_is_refused(encode: object, cut: int) -> None:
    data = encode(_record())  # type: ignore[operator]
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(data[:cut])


def test_foreign_bytes_are_refused() -> None:
    for foreign in (b"\x07" + b"\x00" * 40, b"\x00" * 200, b"PAR1" + b"\x00" * 200):
        with pytest.raises(RecordFormatError):
            CaptureRecord.decode(foreign)
    old = bytearray(_format_1(_record()))
    old[13] = ord("{") + 1  # metadata no longer JSON
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(bytes(old))


def _corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_corrupt_format_2_entries_are_refused() -> None:
    data = _record().encode()
    start = data.index(b"r-1sales_forecast")
    headers_at = data.index(b'{"x-tenant"')
    corrupt = [
        _corrupt(data, 1, b"\x80"),  # an unknown flag
        _corrupt(data, 2 + 24 + 4 + 8, struct.pack("<I", 4)),  # request_id's length: 3 -> 4
        _corrupt(data, start, b"\xff"),  # request_id is not UTF-8
        _corrupt(data, headers_at, b"["),  # headers no longer JSON
        data + b"\x00",  # a byte more than the lengths declare
    ]
    for entry in corrupt:
        with pytest.raises(RecordFormatError):
            CaptureRecord.decode(entry)
    parameters = json.dumps(_record().parameters, separators=(",", ":")).encode()
    text = b'"' + b"x" * (len(parameters) - 2) + b'"'  # JSON, but not an object
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(data.replace(parameters, text))
