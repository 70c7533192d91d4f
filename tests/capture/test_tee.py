"""The capture tee on the request path, seen in the spool: every answered call's record is
there before its answer leaves, with the wire bytes both ways, errors with their status,
batch and trace ids, selected headers and parameters; sampling, size cap and the spool's cap
policies."""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import signal
from collections.abc import Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from headrace.capture.record import CaptureRecord
from headrace.capture.spool import Spool, read_entries
from headrace.capture.tee import COUNTS_FLUSH_S, ModelCapture, SpoolCommitter
from headrace.config import ModelCaptureSettings
from headrace.frontend.auth import hash_token, new_token
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.spec import ModelSpec
from headrace.telemetry.metrics import CaptureMetrics
from tests.capture.conftest import capturing_server, fp32_request, metric, spooled, wait_for
from tests.conftest import ServerThread
from tests.telemetry.conftest import exporting_to, traceparent
from tests.telemetry.receiver import OtlpReceiver

NO_SEALING = {"segment_max_age_s": 3600}
"""Records stay in the open segment, where the tests read them (nothing is uploaded)."""


@contextmanager
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with capturing_server(
        tmp_path,
        models={
            "identity": {"headers": ["x-tenant"]},
            "echo_bytes": {"max_record_bytes": 2048},
            "scaled": {"sample_rate": 0.0},
        },
        **NO_SEALING,
    ) as running:
        yield running


def by_id(records: list[CaptureRecord]) -> dict[str, CaptureRecord]:
    return {record.request_id: record for record in records}


def test_each_answer_leaves_after_its_record_is_spooled(server: ServerThread) -> None:
    with stub(server) as client:
        for index in range(20):
            request = fp32_request(
                "identity", np.arange(index + 1, dtype=np.float32)[None], f"r{index}"
            )
            reply = client.ModelInfer(request)
            record = by_id(spooled(server))[f"r{index}"]  # already there when the answer came
            assert record.request == request.SerializeToString()
            assert pb.ModelInferResponse.FromString(record.response) == reply
            assert (record.model, record.version) == ("identity", "1")
            assert (record.status_code, record.status_message) == (0, "")
            assert record.endpoint == "local"
            assert record.batch_size == 1
            assert record.batch_id
            assert record.received_ns <= record.responded_ns
            assert record.latency_ns > 0
    assert len(spooled(server)) == 20
    # Counts of records written at once reach the metrics within COUNTS_FLUSH_S.
    wait_for(
        lambda: (
            [
                metric(server, "headrace_capture_records_total", model="identity", outcome=outcome)
                for outcome in ("queued", "spooled")
            ]
            == [20, 20]
        ),
        5,
        "20 records counted as queued and spooled",
    )


def test_stream_answers_are_captured_and_unchanged_on_the_wire(server: ServerThread) -> None:
    requests = [
        fp32_request("identity", np.full((1, 3), index, np.float32), f"s{index}")
        for index in range(10)
    ]
    with stub(server) as client:
        replies = list(client.ModelStreamInfer(iter(requests)))
    assert all(not reply.error_message for reply in replies)
    answered = {reply.infer_response.id: reply.infer_response for reply in replies}
    records = by_id(spooled(server))
    for request in requests:
        record = records[request.id]
        assert record.request == request.SerializeToString()
        assert pb.ModelInferResponse.FromString(record.response) == answered[request.id]
        output = np.frombuffer(answered[request.id].raw_output_contents[0], "<f4")
        assert output.tolist() == [float(request.id[1:])] * 3


def test_errors_are_captured_with_their_status(server: ServerThread) -> None:
    wrong_type = pb.ModelInferRequest(
        model_name="identity",
        id="bad",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="INT32", shape=[1, 1])
        ],
        raw_input_contents=[b"\0\0\0\0"],
    )
    with stub(server) as client:
        with pytest.raises(grpc.RpcError) as invalid:
            client.ModelInfer(wrong_type)
        with pytest.raises(grpc.RpcError) as failing:
            client.ModelInfer(fp32_request("failing", np.ones((1, 2), np.float32), "fails"))
        with pytest.raises(grpc.RpcError):
            client.ModelInfer(fp32_request("no_such_model", np.ones((1, 2), np.float32), "unknown"))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failing.value.code() == grpc.StatusCode.INTERNAL
    records = by_id(spooled(server))
    assert records["bad"].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert records["bad"].status_message == invalid.value.details()
    assert records["bad"].request == wrong_type.SerializeToString()
    assert records["bad"].response == b""
    assert records["bad"].batch_size == 0
    assert records["fails"].status_code == grpc.StatusCode.INTERNAL.value[0]
    assert records["fails"].status_message == failing.value.details()
    assert "unknown" not in records  # calls to unknown models are not captured


def test_ids_headers_and_parameters(server: ServerThread) -> None:
    request = fp32_request(
        "identity",
        np.ones((1, 2), np.float32),
        customer=pb.InferParameter(string_param="c-42"),
        retries=pb.InferParameter(int64_param=3),
    )
    with stub(server) as client:
        client.ModelInfer(request, metadata=(("x-tenant", "acme"), ("x-other", "not kept")))
    (record,) = spooled(server)
    assert len(record.request_id) == 32  # generated: the client sent none
    assert record.headers == {"x-tenant": "acme"}
    assert record.parameters == {"customer": "c-42", "retries": 3}


def test_sampled_out_calls_are_counted_not_spooled(server: ServerThread) -> None:
    with stub(server) as client:
        for _ in range(5):
            client.ModelInfer(fp32_request("scaled", np.ones((1, 2), np.float32)))
    assert spooled(server) == []
    assert (
        metric(server, "headrace_capture_records_total", model="scaled", outcome="sampled_out") == 5
    )


def test_a_record_over_the_size_cap_keeps_its_metadata_only(server: ServerThread) -> None:
    values = np.array([[b"x" * 3000]], dtype=object)
    raw = len(values[0, 0]).to_bytes(4, "little") + values[0, 0]
    request = pb.ModelInferRequest(
        model_name="echo_bytes",
        id="big",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="BYTES", shape=[1, 1])
        ],
        raw_input_contents=[raw],
    )
    with stub(server) as client:
        reply = client.ModelInfer(request)
    assert reply.raw_output_contents[0] == raw  # the caller still gets everything
    (record,) = spooled(server)
    assert record.truncated
    assert record.request == b""
    assert record.response == b""
    assert record.request_id == "big"
    assert record.status_code == 0


def test_large_tensors_are_spooled_whole(server: ServerThread) -> None:
    values = np.random.default_rng(3).random((1, 1024 * 1024), dtype=np.float32)  # 4 MiB
    request = fp32_request("identity", values, "large")
    with stub(server) as client:
        reply = client.ModelInfer(request)
    record = by_id(spooled(server))["large"]
    assert record.request == request.SerializeToString()
    assert pb.ModelInferResponse.FromString(record.response) == reply


def test_trace_and_span_ids_are_the_server_span(tmp_path: Path, receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    with capturing_server(tmp_path, tracing=exporting_to(receiver), **NO_SEALING) as server:
        with stub(server) as client:
            client.ModelInfer(
                fp32_request("identity", np.ones((1, 1), np.float32), "traced"),
                metadata=(("traceparent", header),),
            )
        (record,) = spooled(server)
    span = next(
        span
        for span in receiver.in_trace(trace_id)
        if span.name == "inference.GRPCInferenceService/ModelInfer"
    )
    assert (record.trace_id, record.span_id) == (trace_id, span.span_id)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def fill(client: pb_grpc.GRPCInferenceServiceStub, model: str, count: int) -> list[str]:
    ids = [f"{model}-{index}" for index in range(count)]
    for request_id in ids:
        client.ModelInfer(fp32_request(model, np.ones((1, 64), np.float32), request_id))
    return ids


def test_full_spool_drop_counts_exactly_and_refuse_answers_unavailable(tmp_path: Path) -> None:
    with capturing_server(
        tmp_path,
        spool_max_bytes=4096,
        models={"echo_fp32": {"on_spool_full": "refuse"}},
        **NO_SEALING,
    ) as server:
        with stub(server) as client:
            sent = fill(client, "identity", 40)  # about 600 bytes each: the cap is passed
            kept = [record.request_id for record in spooled(server)]
            assert 0 < len(kept) < len(sent)
            assert kept == sent[: len(kept)]
            expected = {"spooled": len(kept), "dropped": len(sent) - len(kept)}
            wait_for(
                lambda: (
                    {
                        outcome: metric(
                            server,
                            "headrace_capture_records_total",
                            model="identity",
                            outcome=outcome,
                        )
                        for outcome in expected
                    }
                    == expected
                ),
                5,
                f"the counts {expected}",
            )
            with pytest.raises(grpc.RpcError) as refused:
                client.ModelInfer(fp32_request("echo_fp32", np.ones((1, 4), np.float32)))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "capture spool is full" in (refused.value.details() or "")
            assert (
                metric(
                    server, "headrace_capture_records_total", model="echo_fp32", outcome="refused"
                )
                == 1
            )
        assert server.application.capture is not None
        assert server.application.capture.spool is not None
        assert server.application.capture.spool.full


@pytest.mark.parametrize("fsync_interval_ms", [0, 20])
def test_fsync_modes_spool_every_answer_before_it_leaves(
    tmp_path: Path, fsync_interval_ms: int
) -> None:
    with (
        capturing_server(tmp_path, fsync_interval_ms=fsync_interval_ms, **NO_SEALING) as server,
        stub(server) as client,
    ):
        for index in range(5):
            request_id = f"f{index}"
            client.ModelInfer(fp32_request("identity", np.ones((1, 3), np.float32), request_id))
            assert request_id in by_id(spooled(server))


def test_the_callers_name_is_captured_never_its_token(tmp_path: Path) -> None:
    token = new_token()
    auth = {
        "enabled": True,
        "tokens": [{"name": "forecaster", "sha256": hash_token(token), "models": ["*"]}],
    }
    with capturing_server(tmp_path, auth=auth, **NO_SEALING) as server, stub(server) as client:
        client.ModelInfer(
            fp32_request("identity", np.ones((1, 2), np.float32), "who"),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        (record,) = spooled(server)
    assert record.identity == "forecaster"
    assert token not in record.encode().decode(errors="replace")


def _shadow_record(request_id: str, size: int) -> CaptureRecord:
    return CaptureRecord(
        request_id=request_id,
        model="echo_fp32",
        version="2",
        received_ns=1,
        responded_ns=2,
        latency_ns=1,
        status_code=0,
        status_message="",
        request=b"q" * size,
        response=b"r" * size,
        parameters={"headrace_shadow": True, "headrace_shadow_of": "1"},
    )


def test_shadow_records_are_spooled_capped_and_dropped_never_refused(tmp_path: Path) -> None:
    with capturing_server(
        tmp_path,
        spool_max_bytes=4096,
        models={"echo_fp32": {"on_spool_full": "refuse", "max_record_bytes": 1024}},
        **NO_SEALING,
    ) as server:
        assert server.application.repository is not None
        capture = server.application.repository.resolve("echo_fp32").capture
        assert capture is not None
        server.run(capture.record_shadow(_shadow_record("small", 100)))
        server.run(capture.record_shadow(_shadow_record("large", 600)))
        small, large = spooled(server)
        assert (small.request_id, small.truncated, len(small.request)) == ("small", False, 100)
        assert (large.request_id, large.truncated, large.request) == ("large", True, b"")
        with stub(server) as client:
            fill(client, "identity", 40)  # the spool's cap is passed
        server.run(capture.record_shadow(_shadow_record("late", 100)))  # no error: dropped
        assert "late" not in {record.request_id for record in spooled(server)}
        assert (
            metric(server, "headrace_capture_records_total", model="echo_fp32", outcome="dropped")
            == 1
        )


def test_records_of_every_size_are_in_before_their_answer_and_counted_exactly(
    server: ServerThread,
) -> None:
    """Small records are written as they come, medium ones by a group commit on the loop,
    large ones by a group commit on the spool's thread: each is in before its answer, and a
    burst mixing them loses none and counts each once."""
    sizes = {"small": 16, "medium": 32 * 1024, "large": 1024 * 1024}  # FP32 elements
    requests = {
        f"{name}-{index}": fp32_request(
            "identity", np.full((1, elements), index, np.float32), f"{name}-{index}"
        )
        for index in range(8)
        for name, elements in sizes.items()
    }
    with stub(server) as client:
        for request_id in ("small-0", "medium-0", "large-0"):
            client.ModelInfer(requests[request_id])
            assert request_id in by_id(spooled(server))
        burst = [
            client.ModelInfer.future(request)
            for request_id, request in requests.items()
            if not request_id.endswith("-0")
        ]
        for call in burst:
            call.result()
    records = spooled(server)
    assert sorted(record.request_id for record in records) == sorted(requests)
    for record in records:
        assert record.request == requests[record.request_id].SerializeToString()
    expected = {"queued": len(requests), "spooled": len(requests), "dropped": 0}
    wait_for(
        lambda: (
            {
                outcome: metric(
                    server, "headrace_capture_records_total", model="identity", outcome=outcome
                )
                for outcome in expected
            }
            == expected
        ),
        5,
        f"the counts {expected}",
    )
    assert metric(server, "headrace_capture_bytes_total", model="identity") == sum(
        len(record.encode()) for record in records
    )


def test_generated_request_ids_differ_per_call(server: ServerThread) -> None:
    with stub(server) as client:
        for _ in range(3):
            client.ModelInfer(fp32_request("identity", np.ones((1, 2), np.float32)))
    ids = [record.request_id for record in spooled(server)]
    assert len(set(ids)) == 3
    assert all(len(request_id) == 32 and int(request_id, 16) >= 0 for request_id in ids)


@contextmanager
def model_capture(
    directory: Path,
    settings: ModelCaptureSettings | None = None,
    metrics: CaptureMetrics | None = None,
    **spool: Any,
) -> Iterator[ModelCapture]:
    """A model's capture on a real spool in `directory`, without a server."""
    settings = settings or ModelCaptureSettings()
    with ThreadPoolExecutor(1) as executor:
        target = Spool(
            directory,
            max_bytes=1 << 30,
            segment_max_bytes=1 << 30,
            segment_max_age_s=3600.0,
            **spool,
        )
        spec = ModelSpec("identity", "1", "python", "python", (), ())
        yield ModelCapture(spec, settings, target, SpoolCommitter(target, executor), metrics)
        target.close()


def _call(capture: ModelCapture, request_id: str, size: int) -> Coroutine[Any, Any, bool]:
    message = pb.ModelInferRequest(model_name="identity", id=request_id)
    return capture.record(
        wire=message.SerializeToString() + b"\0" * size,
        message=message,
        metadata=lambda: None,
        identity="",
        received_ns=1,
        started_ns=0,
        code=0,
        status_message="",
        response=None,
        reply=b"",
        request_id=request_id,
    )


def _spooled_ids(directory: Path) -> list[str]:
    return [
        CaptureRecord.decode(entry).request_id
        for path in sorted(directory.glob("*.open"))
        for entry in read_entries(path)
    ]


def test_a_small_record_is_written_without_a_turn_of_the_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        with model_capture(tmp_path) as capture:
            call = _call(capture, "direct", 100)
            with pytest.raises(StopIteration) as done:
                call.send(None)  # ran to its end: nothing awaited
            assert done.value.value is True
            assert _spooled_ids(tmp_path) == ["direct"]

    asyncio.run(scenario())


def test_with_fsync_per_write_records_wait_for_the_group_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        with model_capture(tmp_path, fsync_interval_ms=0) as capture:
            call = asyncio.ensure_future(_call(capture, "synced", 100))
            await asyncio.sleep(0)
            assert not call.done()  # waits for the group's fsync
            assert await call
            assert _spooled_ids(tmp_path) == ["synced"]

    asyncio.run(scenario())


def test_a_small_record_stays_behind_a_group_being_written(tmp_path: Path) -> None:
    async def scenario() -> None:
        with model_capture(tmp_path) as capture:
            large = asyncio.ensure_future(_call(capture, "large", 1024 * 1024))
            await asyncio.sleep(0)  # its group is pending or being written on the thread
            assert await _call(capture, "small", 100)
            assert await large
            assert await _call(capture, "after", 100)
            assert _spooled_ids(tmp_path) == ["large", "small", "after"]

    asyncio.run(scenario())


FILE_SIZE_LIMIT = 8192
"""Bytes a process may write to one file in `_record_past_the_file_size_limit`."""


def _record_past_the_file_size_limit(
    directory: str, policy: str, fsync_interval_ms: int | None
) -> tuple[list[bool], dict[str, float | None], list[str]]:
    """In a process of its own: records before, at and after a write that the OS refuses
    (the segment would pass RLIMIT_FSIZE: EFBIG), what `record()` said of each, the counters,
    and the ids in the spool."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    registry = CollectorRegistry()
    settings = ModelCaptureSettings.model_validate({"on_spool_full": policy})
    said: list[bool] = []

    async def scenario() -> None:
        with model_capture(
            Path(directory), settings, CaptureMetrics(registry), fsync_interval_ms=fsync_interval_ms
        ) as capture:
            for request_id, size in (
                ("fits", 100),
                ("too-large", 2 * FILE_SIZE_LIMIT),
                ("fits-again", 100),
            ):
                said.append(await _call(capture, request_id, size))
            await asyncio.sleep(2 * COUNTS_FLUSH_S)  # the counts of records written at once

    asyncio.run(scenario())
    counts = {
        outcome: registry.get_sample_value(
            "headrace_capture_records_total", {"model": "identity", "outcome": outcome}
        )
        for outcome in ("queued", "spooled", "dropped")
    }
    return said, counts, _spooled_ids(Path(directory))


@pytest.mark.parametrize("fsync_interval_ms", [None, 0])  # written at once / group commit
@pytest.mark.parametrize("policy", ["drop", "refuse"])
def test_a_failed_write_drops_the_record_and_refuses_its_answer_when_the_policy_says_so(
    tmp_path: Path, policy: str, fsync_interval_ms: int | None
) -> None:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
        said, counts, ids = process.submit(
            _record_past_the_file_size_limit, str(tmp_path), policy, fsync_interval_ms
        ).result()
    assert said == [True, policy == "drop", True]
    assert counts == {"queued": 3, "spooled": 2, "dropped": 1}
    assert ids == ["fits", "fits-again"]  # the torn write was cut back
