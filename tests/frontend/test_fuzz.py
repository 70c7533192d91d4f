"""Fuzzing the real gRPC front end with hypothesis: random bytes, truncated and mutated valid
messages, and well-formed but hostile requests (huge, negative and mismatched shapes, wrong
datatypes, NaN, empty and unicode names, duplicate inputs, oversized strings, bad parameters),
sent as raw bytes through unary calls and ModelStreamInfer.

Every answer must be OK or a client-error status (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, or DEADLINE_EXCEEDED from the request's own `timeout` parameter), never
INTERNAL or UNKNOWN; the server never crashes; the next valid request succeeds.

The normal test command runs a fast subset. `make fuzz` runs FUZZ_EXAMPLES examples per test
(default 20000, eight tests: 160k cases).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.config import Settings, load_settings
from headrace.frontend.auth import hash_token, new_token
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.datatypes import DATATYPES
from tests.conftest import ServerThread, served_test_models

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
"""Examples per test; 0: the fast subset."""
FUZZ = settings(
    max_examples=EXAMPLES or 60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SERVICE = "/inference.GRPCInferenceService/"
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # A shared-memory parameter where server.system_shared_memory is off.
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
CALL_TIMEOUT_S = 30.0
FUZZED_MODELS = ("identity", "add_sub", "add_sub_batched", "fixed", "sales_forecast")
FUZZED_MODELS += tuple(f"echo_{name.lower()}" for name in DATATYPES)
_SLOW_OR_FAILING = {"slow", "failing", "wrong_output"}
"""Test models that fail or stall on purpose: INTERNAL from them is their job."""


def _settings(auth: dict[str, Any] | None = None, captures: Path | None = None) -> Settings:
    """The embedded default plus the test models; capture (the default's, so hostile calls go
    through the tee and the spool too) into `captures`, else off."""
    tree = load_settings(None).model_dump(mode="json")
    tree["capture"] = (
        {
            "enabled": True,
            "spool_dir": str(captures / "spool"),
            "store": {"kind": "local", "path": str(captures / "store"), "fsync": False},
        }
        if captures is not None
        else {"enabled": False}
    )
    if auth is not None:
        tree["server"]["auth"] = auth
    tree["server"].update(host="127.0.0.1", port=0, shutdown_grace_period_s=5)
    # Limits far above anything the fuzzer makes: the decoder itself must stand hostile shapes
    # (test_limits covers the limits).
    tree["server"]["limits"] = {
        "max_request_elements": 1 << 62,
        "max_request_bytes": 1 << 62,
        "max_tensor_rank": 32,
    }
    tree["server"]["system_shared_memory"] = auth is None  # on: its decoding is fuzzed too
    tree["models"] += [m for m in served_test_models() if m["name"] not in _SLOW_OR_FAILING]
    return Settings.model_validate(tree)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(_settings(captures=tmp_path_factory.mktemp("captures"))) as running:
        yield running


@pytest.fixture(scope="module")
def channel(fuzzed: ServerThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(fuzzed.address, options=options) as opened:
        yield opened


def _valid_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="identity",
        id="valid",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 3])
        ],
        raw_input_contents=[np.array([1, 2, 3], dtype="<f4").tobytes()],
    )


VALID = _valid_request().SerializeToString()


def _call(
    channel: grpc.Channel,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(SERVICE + method)
    try:
        call(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_client_error(
    code: grpc.StatusCode, details: str, allowed: frozenset[grpc.StatusCode] = CLIENT_ERRORS
) -> None:
    assert code in allowed, f"{code.name}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The server's own answer to a tiny `timeout` parameter, never the client giving up.
        assert "passed its deadline" in details, details


def _assert_still_serving(channel: grpc.Channel) -> None:
    reply = channel.unary_unary(SERVICE + "ModelInfer")(VALID, timeout=CALL_TIMEOUT_S)
    decoded = pb.ModelInferResponse.FromString(reply)
    assert np.frombuffer(decoded.raw_output_contents[0], "<f4").tolist() == [1, 2, 3]


# -- strategies ------------------------------------------------------------------------------

_names = st.one_of(
    st.sampled_from(["INPUT0", "INPUT1", "FEATURES", ""]),
    st.text(max_size=20),
    st.text(min_size=1000, max_size=3000),
)
_datatypes = st.one_of(st.sampled_from(list(DATATYPES)), st.text(max_size=8))
_dims = st.one_of(
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([-1, 2**31, 2**32, 2**40, 2**62]),
)
_huge_dims = st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, -1, -(2**63)]) | _dims
_shapes = st.lists(_dims, max_size=6) | st.lists(st.integers(0, 2), min_size=30, max_size=40)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


_VALUES = {
    "fp32_contents": _floats,
    "fp64_contents": st.floats(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "bool_contents": st.booleans(),
    "bytes_contents": st.binary(max_size=64) | st.binary(min_size=5000, max_size=20000),
}


@st.composite
def _contents_for(draw: st.DrawFn, datatype: str, shape: list[int]) -> pb.InferTensorContents:
    """Typed contents: mostly the datatype's own field with the shape's count of values
    (hostile values: NaN, extremes, out-of-range), sometimes another field or a wrong count."""
    known = DATATYPES.get(datatype)
    count = math.prod(shape) if shape and all(0 <= d < 64 for d in shape) else 0
    own = known.contents_field if known is not None else None
    field = own if own and draw(st.integers(0, 3)) else draw(st.sampled_from(sorted(_VALUES)))
    size = count if draw(st.integers(0, 3)) else draw(st.integers(0, 16))
    values = draw(st.lists(_VALUES[field], min_size=min(size, 64), max_size=min(size, 64)))
    return pb.InferTensorContents(**{field: values})


@st.composite
def _raw_for(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Raw contents that fit the shape (usually) or do not (sometimes)."""
    known = DATATYPES.get(datatype)
    count = math.prod(shape) if shape and all(0 <= d < 64 for d in shape) else 0
    if known is not None and known.itemsize and draw(st.booleans()):
        return draw(st.binary(min_size=count * known.itemsize, max_size=count * known.itemsize))
    if datatype == "BYTES" and draw(st.booleans()):
        elements = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
        return b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    return draw(st.binary(max_size=64))


_parameter = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
    st.builds(pb.InferParameter, string_param=st.text(max_size=16)),
    st.builds(pb.InferParameter, double_param=st.floats()),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
)
_parameters = st.dictionaries(
    st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output"]) | st.text(),
    _parameter,
    max_size=3,
)


SIGNATURES: dict[str, list[tuple[str, str, int]]] = {
    model.name: [(tensor.name, tensor.datatype, len(tensor.dims)) for tensor in model.inputs]
    for model in _settings().models
    if model.name in FUZZED_MODELS and hasattr(model, "inputs")
}
"""Each fuzzed model's inputs (name, datatype, rank without the batch dimension): hostile
requests mostly start from a model's real signature, so they get past the first checks."""


@st.composite
def _near_shape(draw: st.DrawFn, rank: int) -> list[int]:
    """A shape of about the declared rank, with small sizes and now and then a hostile one."""
    shape = draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank + 1))
    if shape and draw(st.booleans()):
        shape[draw(st.integers(0, len(shape) - 1))] = draw(_huge_dims)
    return shape


_tensor_parameters = st.dictionaries(
    st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]),
    _parameter,
    max_size=3,
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Well-formed ModelInferRequests with hostile contents, mostly aimed at a real model."""
    model = draw(st.sampled_from(sorted(SIGNATURES)) | st.text(max_size=12))
    signature = SIGNATURES.get(model, [])
    count = draw(st.integers(0, 4))
    use_raw = draw(st.booleans())
    inputs = []
    raw = []
    for index in range(count):
        if signature and draw(st.integers(0, 4)):
            name, datatype, rank = signature[index % len(signature)]
            if not draw(st.integers(0, 5)):
                datatype = draw(_datatypes)
            shape = draw(_near_shape(rank) | _shapes)
        else:
            name, datatype, shape = draw(_names), draw(_datatypes), draw(_shapes)
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        if not draw(st.integers(0, 7)):
            for key, value in draw(_tensor_parameters).items():
                tensor.parameters[key].CopyFrom(value)
        if use_raw:
            raw.append(draw(_raw_for(datatype, shape)))
        if not use_raw or draw(st.integers(0, 9)) == 0:
            tensor.contents.CopyFrom(draw(_contents_for(datatype, shape)))
        inputs.append(tensor)
    if use_raw and draw(st.integers(0, 9)) == 0:
        raw.append(b"extra")  # one more raw entry than inputs
    request = pb.ModelInferRequest(
        model_name=model,
        model_version=draw(st.sampled_from(["", "", "1", "2", "0", "-1", "99999999999999999999"])),
        id=draw(st.text(max_size=40)),
        inputs=inputs,
        raw_input_contents=raw,
        outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
            for name in draw(st.lists(_names | st.just("OUTPUT0"), max_size=2))
        ],
    )
    for key, value in draw(_parameters).items():
        request.parameters[key].CopyFrom(value)
    return request


@st.composite
def mutated_valid_bytes(draw: st.DrawFn) -> bytes:
    """A valid request's bytes, truncated, with bytes flipped, inserted or duplicated."""
    data = bytearray(draw(hostile_requests()).SerializeToString() if draw(st.booleans()) else VALID)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "flip", "insert", "duplicate"]))
        position = draw(st.integers(0, len(data)))
        if action == "truncate":
            del data[position:]
        elif action == "flip" and data:
            index = min(position, len(data) - 1)
            data[index] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += data[position:]
    return bytes(data)


_any_bytes = st.binary(max_size=512) | mutated_valid_bytes()
_hostile_bytes = hostile_requests().map(lambda request: request.SerializeToString())


# -- tests -----------------------------------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes_to_model_infer(channel: grpc.Channel, payload: bytes) -> None:
    _assert_client_error(*_call(channel, "ModelInfer", payload))
    _assert_still_serving(channel)


@FUZZ
@given(payload=mutated_valid_bytes())
def test_mutated_valid_requests(channel: grpc.Channel, payload: bytes) -> None:
    _assert_client_error(*_call(channel, "ModelInfer", payload))
    _assert_still_serving(channel)


@FUZZ
@given(request=hostile_requests())
def test_hostile_but_well_formed_requests(
    channel: grpc.Channel, request: pb.ModelInferRequest
) -> None:
    _assert_client_error(*_call(channel, "ModelInfer", request.SerializeToString()))
    _assert_still_serving(channel)


@st.composite
def hostile_shapes(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A real model's inputs with shapes mixing zeros, ones and huge or negative sizes, and
    few or no bytes of contents: the decoder must refuse them without allocating."""
    model = draw(st.sampled_from(sorted(SIGNATURES)))
    sizes = st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
    request = pb.ModelInferRequest(model_name=model)
    use_raw = draw(st.booleans())
    for name, datatype, rank in SIGNATURES[model]:
        shape = draw(st.lists(sizes, min_size=max(0, rank - 1), max_size=rank + 2))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if use_raw:
            request.raw_input_contents.append(draw(st.binary(max_size=16)))
        else:
            tensor.contents.CopyFrom(draw(_contents_for(datatype, shape)))
    return request


@FUZZ
@given(request=hostile_shapes())
def test_hostile_shapes(channel: grpc.Channel, request: pb.ModelInferRequest) -> None:
    _assert_client_error(*_call(channel, "ModelInfer", request.SerializeToString()))


@FUZZ
@given(
    method=st.sampled_from(
        [
            "ModelMetadata",
            "ModelConfig",
            "ModelReady",
            "ModelStatistics",
            "RepositoryIndex",
            "ServerMetadata",
            "ServerLive",
            "ServerReady",
        ]
    ),
    payload=_any_bytes,
)
def test_random_bytes_to_other_methods(channel: grpc.Channel, method: str, payload: bytes) -> None:
    _assert_client_error(*_call(channel, method, payload))


@FUZZ
@given(
    name=st.sampled_from(FUZZED_MODELS) | st.text(max_size=300),
    version=st.text(max_size=30),
    method=st.sampled_from(["ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics"]),
)
def test_hostile_model_names(channel: grpc.Channel, name: str, version: str, method: str) -> None:
    message = getattr(pb, f"{method}Request")(name=name, version=version)
    _assert_client_error(*_call(channel, method, message.SerializeToString()))


@FUZZ
@given(payloads=st.lists(_any_bytes | _hostile_bytes, max_size=6))
def test_streams_answer_every_message(channel: grpc.Channel, payloads: list[bytes]) -> None:
    """Each message on ModelStreamInfer gets exactly one answer; the stream itself ends OK
    and goes on serving after any number of bad messages."""
    stream = channel.stream_stream(SERVICE + "ModelStreamInfer")
    replies = [
        pb.ModelStreamInferResponse.FromString(reply)
        for reply in stream(iter([*payloads, VALID]), timeout=CALL_TIMEOUT_S)
    ]
    assert len(replies) == len(payloads) + 1
    for reply in replies:
        assert "internal error" not in reply.error_message, reply.error_message
    valid = [reply for reply in replies if reply.infer_response.id == "valid"]
    assert any(not reply.error_message for reply in valid)


TOKEN = new_token()
AUTH = {
    "enabled": True,
    "tokens": [{"name": "fuzzer", "sha256": hash_token(TOKEN), "models": ["echo_*", "add_*"]}],
}
AUTH_ERRORS = CLIENT_ERRORS | {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture(scope="module")
def guarded_channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    captures = tmp_path_factory.mktemp("captures")
    with (
        ServerThread(_settings(AUTH, captures)) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        yield ch


_metadata = st.sampled_from(
    [(), (("authorization", f"Bearer {TOKEN}"),), (("authorization", "Bearer hr_nope"),)]
)


@FUZZ
@given(payload=_any_bytes | _hostile_bytes, metadata=_metadata)
def test_hostile_requests_with_auth(
    guarded_channel: grpc.Channel, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> None:
    """With auth on, the same inputs also get UNAUTHENTICATED (no or a wrong token) and
    PERMISSION_DENIED (models outside the token's scope), nothing else new."""
    code, details = _call(guarded_channel, "ModelInfer", payload, metadata)
    _assert_client_error(code, details, AUTH_ERRORS)
    if not metadata or "hr_nope" in metadata[0][1]:
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
