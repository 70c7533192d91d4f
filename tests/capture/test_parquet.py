"""Capture records -> Arrow -> Parquet bytes -> rows: every datatype comes back exactly."""

from __future__ import annotations

import io
import json

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from headrace.capture.parquet import (
    DATATYPE_METADATA_KEY,
    CaptureRow,
    records_to_table,
    rows_from_table,
)
from headrace.capture.record import CaptureRecord
from headrace.inference import InferenceResponse
from headrace.protocol.converters import response_to_proto
from headrace.protocol.datatypes import DATATYPES
from tests.capture.samples import BASE_NS, make_record, request_bytes, typed_request_bytes

NUMERIC = [name for name in DATATYPES if name not in ("BYTES", "BF16")]


def through_parquet(records: list[CaptureRecord]) -> list[CaptureRow]:
    buffer = io.BytesIO()
    pq.write_table(records_to_table(records), buffer, compression="zstd")
    return list(rows_from_table(pq.read_table(io.BytesIO(buffer.getvalue()))))


def assert_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        # Bit for bit: NaN payloads, signed zeros and all.
        assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def tensors(datatype: str) -> st.SearchStrategy[np.ndarray]:
    if datatype == "BYTES":
        return shapes.flatmap(
            lambda shape: st.lists(
                st.binary(max_size=12),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            ).map(lambda items: np.array([*items, b""], dtype=object)[:-1].reshape(shape))
        )
    if datatype == "BF16":
        # Every bit pattern, NaNs included.
        return hnp.arrays(np.uint16, shapes).map(lambda bits: bits.view(ml_dtypes.bfloat16))
    dtype = DATATYPES[datatype].dtype
    if dtype.kind == "f":
        return hnp.arrays(np.dtype(f"u{dtype.itemsize}"), shapes).map(lambda b: b.view(dtype))
    return hnp.arrays(dtype, shapes)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_datatype_round_trips_exactly(datatype: str, data: st.DataObject) -> None:
    sent = data.draw(tensors(datatype))
    answered = data.draw(tensors(datatype))
    (row,) = through_parquet([make_record("r1", {"IN": sent}, {"OUT": answered})])
    assert_exact(row.inputs["IN"], sent)
    assert_exact(row.outputs["OUT"], answered)


def test_field_metadata_names_the_datatype_and_half_floats_are_stored_as_float32() -> None:
    inputs = {
        "half": np.array([1.5], dtype=np.float16),
        "brain": np.array([1.5], dtype=ml_dtypes.bfloat16),
        "text": np.array([b"x"], dtype=object),
    }
    schema = records_to_table([make_record("r", inputs)]).schema
    for name, datatype in (("half", "FP16"), ("brain", "BF16"), ("text", "BYTES")):
        column = schema.field(f"input.{name}")
        assert column.metadata[DATATYPE_METADATA_KEY] == datatype.encode()
    assert schema.field("input.half").type == pa.list_(pa.float32())
    assert schema.field("input.brain").type == pa.list_(pa.float32())
    assert schema.field("input.text").type == pa.list_(pa.binary())
    assert schema.field("input_shape.half").type == pa.list_(pa.int64())


def test_bytes_keep_nul_and_arbitrary_bytes() -> None:
    values = np.array([b"\x00", b"a\x00b", bytes(range(256)), b""], dtype=object).reshape(2, 2)
    (row,) = through_parquet([make_record("r", {"B": values}, {"O": values})])
    assert_exact(row.inputs["B"], values)
    assert_exact(row.outputs["O"], values)


def test_rows_with_different_tensors_and_failed_calls_hold_nulls() -> None:
    a = np.arange(3, dtype=np.int32)
    b = np.ones((2, 2), dtype=np.float64)
    records = [
        make_record("both", {"A": a, "B": b}, {"OUT": a}),
        make_record("only-a", {"A": a}, {"OUT": a}),
        make_record("failed", {"B": b}, None, status_code=3, status_message="bad input"),
    ]
    table = records_to_table(records)
    assert table.column("input.A").null_count == 1
    assert table.column("input.B").null_count == 1
    assert table.column("output.OUT").to_pylist()[2] is None
    both, only_a, failed = through_parquet(records)
    assert set(both.inputs) == {"A", "B"}
    assert set(only_a.inputs) == {"A"}
    assert set(failed.inputs) == {"B"}
    assert failed.outputs == {}
    assert failed.status == "INVALID_ARGUMENT"
    assert failed.status_message == "bad input"
    assert_exact(failed.inputs["B"], b)


def test_metadata_round_trips() -> None:
    record = make_record(
        "rid",
        {"A": np.zeros(1, np.float32)},
        {"O": np.zeros(1, np.float32)},
        received_ns=BASE_NS + 123,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        batch_id="batch-9",
        batch_size=4,
        endpoint="127.0.0.1:8001",
        identity="alice",
        headers={"x-team": "forecast", "x-empty": ""},
        parameters={"flag": True, "n": 2**62, "ratio": 0.5, "s": "text"},
    )
    (row,) = through_parquet([record])
    assert (row.request_id, row.model, row.version) == ("rid", "m", "1")
    assert row.received_ns == BASE_NS + 123
    assert row.responded_ns == record.responded_ns
    assert row.latency_ns == record.latency_ns
    assert (row.status_code, row.status) == (0, "OK")
    assert (row.trace_id, row.span_id) == (record.trace_id, record.span_id)
    assert (row.batch_id, row.batch_size, row.endpoint, row.identity) == (
        "batch-9",
        4,
        "127.0.0.1:8001",
        "alice",
    )
    assert row.headers == record.headers
    assert row.parameters == record.parameters
    assert row.received.isoformat() == "2026-11-27T10:15:00+00:00"
    assert not row.truncated
    assert row.decode_error == ""


def test_times_are_utc_nanosecond_timestamps() -> None:
    table = records_to_table([make_record("r", {"A": np.zeros(1, np.int8)}, received_ns=5)])
    assert table.schema.field("received").type == pa.timestamp("ns", tz="UTC")
    assert table.column("received").cast(pa.int64()).to_pylist() == [5]
    assert json.loads(table.column("parameters")[0].as_py()) == {}


def test_typed_contents_and_requested_outputs() -> None:
    request = typed_request_bytes("T", [1, -2, 3])
    record = CaptureRecord("r", "m", "1", BASE_NS, BASE_NS, 0, 0, "", request)
    (row,) = through_parquet([record])
    assert_exact(row.inputs["T"], np.array([1, -2, 3], dtype="<i4"))

    asked = request_bytes({"A": np.zeros(1, np.int8)}, outputs=("O2", "O1"))
    (row,) = through_parquet([CaptureRecord("r", "m", "1", BASE_NS, BASE_NS, 0, 0, "", asked)])
    assert row.requested_outputs == ("O2", "O1")


def test_undecodable_and_conflicting_calls_are_kept_as_bytes() -> None:
    good = make_record("good", {"A": np.arange(2, dtype=np.int32)})
    conflicting = make_record("other-type", {"A": np.arange(2, dtype=np.float32)})
    garbage = CaptureRecord("garbage", "m", "1", BASE_NS, BASE_NS, 0, 3, "bad", b"\xff\x01")
    table = records_to_table([good, conflicting, garbage])
    assert table.schema.field("input.A").metadata[DATATYPE_METADATA_KEY] == b"INT32"
    assert table.column("undecoded_request").to_pylist() == [
        None,
        conflicting.request,
        garbage.request,
    ]
    rows = through_parquet([good, conflicting, garbage])
    assert_exact(rows[1].inputs["A"], np.arange(2, dtype=np.float32))
    assert "FP32" in rows[1].decode_error
    assert rows[2].inputs == {}
    assert "protobuf" in rows[2].decode_error


def test_truncated_records_keep_their_metadata() -> None:
    record = CaptureRecord(
        "r", "m", "1", BASE_NS, BASE_NS, 1, 0, "", b"", b"", truncated=True, trace_id="t" * 32
    )
    (row,) = through_parquet([record])
    assert row.truncated
    assert row.inputs == {}
    assert row.outputs == {}
    assert row.trace_id == "t" * 32


def test_response_parameters_are_kept() -> None:
    response = response_to_proto(
        InferenceResponse("m", "1", "r", {"O": np.zeros(1, np.int8)}, parameters={"k": "v"})
    ).SerializeToString()
    record = make_record("r", {"A": np.zeros(1, np.int8)})
    record = CaptureRecord(**{**_fields(record), "response": response})
    (row,) = through_parquet([record])
    assert row.response_parameters == {"k": "v"}


def _fields(record: CaptureRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in CaptureRecord.__dataclass_fields__}


TENSOR_CHOICES = {
    "A": np.arange(4, dtype=np.int32).reshape(2, 2),
    "B": np.array([b"x\x00", b""], dtype=object),
    "C": np.array([0.5], dtype=np.float16),
    "A_as_float": np.arange(4, dtype=np.float32).reshape(2, 2),
}


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sets(st.sampled_from(sorted(TENSOR_CHOICES)), min_size=1),
            st.booleans(),
            st.sets(st.sampled_from(["OUT", "EXTRA"])),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_mix_of_calls_round_trips(calls: list[tuple[set[str], bool, set[str]]]) -> None:
    """Rows with different inputs, failed calls without a response, and a tensor whose
    datatype changes between calls all come back as sent."""
    records, expected = [], []
    for index, (names, answered, output_names) in enumerate(calls):
        inputs = {name.split("_")[0]: TENSOR_CHOICES[name] for name in sorted(names)}
        outputs = {name: np.array([index], np.uint64) for name in output_names}
        records.append(make_record(f"r{index}", inputs, outputs if answered else None))
        expected.append((inputs, outputs if answered else {}))
    rows = through_parquet(records)
    assert [row.request_id for row in rows] == [f"r{i}" for i in range(len(calls))]
    for row, (inputs, outputs) in zip(rows, expected, strict=True):
        assert set(row.inputs) == set(inputs)
        for name, array in inputs.items():
            assert_exact(row.inputs[name], array)
        assert set(row.outputs) == set(outputs)
        for name, array in outputs.items():
            assert_exact(row.outputs[name], array)
