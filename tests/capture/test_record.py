import pytest

from headrace.capture.record import CaptureRecord, RecordFormatError


def _record() -> CaptureRecord:
    return CaptureRecord(
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
        headers={"x-tenant": "acme"},
        parameters={"priority": 1, "sampled": True, "note": "n", "ratio": 0.5},
    )


def test_round_trip() -> None:
    record = _record()
    assert CaptureRecord.decode(record.encode()) == record
    assert CaptureRecord.decode(memoryview(record.encode())) == record


@pytest.mark.parametrize("cut", [0, 5, 20, -1])
def test_torn_entry_is_refused(cut: int) -> None:
    data = _record().encode()
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(data[:cut])


def test_foreign_bytes_are_refused() -> None:
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(b"\x07" + b"\x00" * 40)
    data = bytearray(_record().encode())
    data[13] = ord("{") + 1  # metadata no longer JSON
    with pytest.raises(RecordFormatError):
        CaptureRecord.decode(bytes(data))
