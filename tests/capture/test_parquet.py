"""Capture records -> Arrow -> Parquet bytes -> rows: every datatype comes back exactly."""

from __future__ import annotations

import io
import json
from typing import Any

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf.message import DecodeError
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
from headrace.errors import HeadraceError
from headrace.inference import InferenceResponse
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import request_from_proto, response_to_proto
from headrace.protocol.datatypes import DATATYPES
from tests.capture.samples import (
    BASE_NS,
    make_record,
    request_bytes,
    response_bytes,
    typed_request_bytes,
)

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


def _raw_message(
    datatype: str, shape: list[int], raw: bytes, **tensor: Any
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version="1")
    message.inputs.add(name="X", datatype=datatype, shape=shape, **tensor)
    message.raw_input_contents.append(raw)
    return message


def _request_record(request_id: str, message: pb.ModelInferRequest | bytes) -> CaptureRecord:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return CaptureRecord(request_id, "m", "1", BASE_NS, BASE_NS, 0, 0, "", data)


def _converters_view(record: CaptureRecord) -> tuple[str, dict[str, np.ndarray]]:
    """What the converters make of a record's request: the error, or the inputs."""
    try:
        request = request_from_proto(pb.ModelInferRequest.FromString(record.request))
    except DecodeError:
        return "not a valid protobuf message", {}
    except HeadraceError as exc:
        return exc.message, {}
    return "", request.inputs


def _bytes_contents(elements: list[bytes]) -> bytes:
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Requests with raw contents that match their shape or do not (a byte more or less,
    BYTES lengths that overrun), typed contents, shared-memory or other parameters."""
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    count = int(np.prod(shape))
    if datatype == "BYTES":
        raw = _bytes_contents(draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count)))
    else:
        size = count * DATATYPES[datatype].itemsize
        raw = draw(st.binary(min_size=size, max_size=size + 2))
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    message = _raw_message(datatype, shape, raw)
    if draw(st.integers(0, 9)) == 0:
        message.inputs[0].parameters["shared_memory_region"].string_param = "region"
        message.inputs[0].parameters["shared_memory_byte_size"].int64_param = len(raw)
    if draw(st.integers(0, 9)) == 0:
        message.inputs[0].parameters["other"].bool_param = True
    if draw(st.integers(0, 9)) == 0:
        message.ClearField("raw_input_contents")
        message.inputs[0].contents.int_contents.extend(range(count))
    data: bytes = message.SerializeToString()
    return data


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(raw_requests(), min_size=1, max_size=4))
def test_rows_are_what_the_converters_make_of_each_request(requests: list[bytes]) -> None:
    """Raw tensors go into columns without the converters, but each row holds exactly the
    arrays the converters decode, or fails with their reason, kept as bytes."""
    records = [_request_record(f"r{index}", data) for index, data in enumerate(requests)]
    rows = through_parquet(records)
    plan: dict[str, np.dtype[Any]] = {}
    for record, row in zip(records, rows, strict=True):
        error, inputs = _converters_view(record)
        if not error and "X" in inputs:
            known = plan.setdefault("X", inputs["X"].dtype)
            if known != inputs["X"].dtype:
                assert "in earlier calls of the same file" in row.decode_error
                continue
        assert (error in row.decode_error) if error else row.decode_error == ""
        assert set(row.inputs) == set(inputs)
        for name, array in inputs.items():
            if array.dtype == np.bool_:  # raw BOOL bytes other than 0 and 1 come back as 1
                array = array.view(np.uint8) != 0
            assert_exact(row.inputs[name], array)


def test_raw_and_typed_contents_share_a_column() -> None:
    raw = _raw_message("INT32", [3], np.array([4, 5, 6], "<i4").tobytes())
    records = [
        _request_record("raw", raw),
        _request_record("typed", typed_request_bytes("X", [1, -2, 3])),
        _request_record("raw-again", raw),
    ]
    table = records_to_table(records)
    assert table.column("input.X").to_pylist() == [[4, 5, 6], [1, -2, 3], [4, 5, 6]]
    assert table.column("decode_error").to_pylist() == [None, None, None]


def test_raw_contents_that_do_not_fit_the_shape_keep_the_call_as_bytes() -> None:
    good = _raw_message("FP32", [2], np.array([1.5, 2.5], "<f4").tobytes())
    short = _raw_message("FP32", [2], b"\x00" * 7)
    overrun = _raw_message("BYTES", [1], (9).to_bytes(4, "little") + b"abc")
    records = [_request_record(name, m) for name, m in (("g", good), ("s", short), ("o", overrun))]
    table = records_to_table(records)
    assert table.column("undecoded_request").to_pylist() == [
        None,
        records[1].request,
        records[2].request,
    ]
    errors = table.column("decode_error").to_pylist()
    assert errors[0] is None
    assert "raw contents of input 'X' hold 7 bytes; shape [2] of FP32 needs 8" in errors[1]
    assert "element 0 declares 9 bytes but only 3 remain" in errors[2]
    assert table.column("input.X").to_pylist() == [[1.5, 2.5], None, None]


def test_empty_and_scalar_tensors() -> None:
    cases = [
        ("FP32", [0], b""),
        ("FP32", [2, 0, 3], b""),
        ("INT64", [], (7).to_bytes(8, "little")),
        ("BYTES", [0, 2], b""),
        ("BYTES", [], _bytes_contents([b""])),
    ]
    records = [
        _request_record(f"r{index}", _raw_message(datatype, shape, raw))
        for index, (datatype, shape, raw) in enumerate(cases)
    ]
    rows = [row for record in records for row in through_parquet([record])]
    for (_, shape, _), row in zip(cases, rows, strict=True):
        assert row.decode_error == ""
        assert row.inputs["X"].shape == tuple(shape)
    assert rows[2].inputs["X"].tolist() == 7
    assert rows[4].inputs["X"].tolist() == b""


def test_calls_of_one_layout_keep_their_own_values_ids_and_parameters() -> None:
    """Messages that differ only in id, parameters and raw contents share a cached layout;
    each row still gets its own contents, requested outputs and response parameters."""
    records = []
    for index in range(5):
        request = _raw_message("UINT16", [2], np.array([index, 1000 - index], "<u2").tobytes())
        request.id = f"id-{index}"
        request.parameters["n"].int64_param = index
        if index % 2:
            request.outputs.add(name="O")
        response = pb.ModelInferResponse.FromString(
            response_bytes({"O": np.array([index], np.int8)})
        )
        response.id = f"id-{index}"
        if index:
            response.parameters["k"].int64_param = index
        records.append(
            CaptureRecord(
                f"r{index}",
                "m",
                "1",
                BASE_NS,
                BASE_NS,
                0,
                0,
                "",
                request.SerializeToString(),
                response.SerializeToString(),
            )
        )
    rows = through_parquet(records)
    for index, row in enumerate(rows):
        assert_exact(row.inputs["X"], np.array([index, 1000 - index], "<u2"))
        assert_exact(row.outputs["O"], np.array([index], np.int8))
        assert row.requested_outputs == (("O",) if index % 2 else ())
        assert row.response_parameters == ({"k": index} if index else {})


def test_bytes_from_raw_and_typed_contents_share_a_column() -> None:
    raw = _raw_message("BYTES", [2], _bytes_contents([b"a\x00", b""]))
    typed = pb.ModelInferRequest(model_name="m", model_version="1")
    tensor = typed.inputs.add(name="X", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"\xff")
    rows = through_parquet([_request_record("raw", raw), _request_record("typed", typed)])
    assert_exact(rows[0].inputs["X"], np.array([b"a\x00", b""], dtype=object))
    assert_exact(rows[1].inputs["X"], np.array([[b"\xff"]], dtype=object))


def test_shared_memory_inputs_are_kept_as_bytes_with_the_reason() -> None:
    message = _raw_message("FP32", [1], b"")
    message.ClearField("raw_input_contents")
    message.inputs[0].parameters["shared_memory_region"].string_param = "region"
    message.inputs[0].parameters["shared_memory_byte_size"].int64_param = 4
    (row,) = through_parquet([_request_record("r", message)])
    assert "shared memory region 'region'" in row.decode_error
    assert row.inputs == {}
