"""Bearer tokens and their scopes through the real front end: every status (UNAUTHENTICATED,
PERMISSION_DENIED, OK) on every kind of method, open health and reflection, the tokens file
and its reload, the identity in spans and in the request's context, and no token in any log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.config import LoggingSettings, Settings
from headrace.frontend.auth import IDENTITY_ATTRIBUTE, hash_token, new_token
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from headrace.telemetry.logs import log_handler
from tests.conftest import TEST_MODELS, ServerThread, make_settings
from tests.telemetry.receiver import OtlpReceiver

READER = new_token()
"""May use identity, scaled and whoami."""
GLOBBER = new_token()
"""May use echo_* models."""
OPS = new_token()
"""Admin, no models."""
FILED = new_token()
"""Known from the tokens file only."""
LATE = new_token()
"""Added to the tokens file later (reload)."""

WHOAMI = {
    "name": "whoami",
    "entrypoint": f"{TEST_MODELS}:WhoAmI",
    "execution": "inline",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "dims": [1]}],
}


def _entry(name: str, token: str, **scopes: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_token(token), **scopes}


def _auth_settings(tokens_file: Path, **auth: Any) -> Settings:
    tree = make_settings().model_dump(mode="json")
    tree["models"].append(WHOAMI)
    tree["server"]["auth"] = {
        "enabled": True,
        "tokens": [
            _entry("reader", READER, models=["identity", "scaled", "whoami"]),
            _entry("globber", GLOBBER, models=["echo_*"]),
            _entry("ops", OPS, admin=True),
        ],
        "tokens_file": str(tokens_file),
        **auth,
    }
    return Settings.model_validate(tree)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    path.write_text(yaml.safe_dump([_entry("filed", FILED, models=["identity"])]))
    return path


@pytest.fixture(scope="module")
def guarded(tokens_file: Path) -> Iterator[ServerThread]:
    with ServerThread(_auth_settings(tokens_file)) as running:
        yield running


@pytest.fixture
def stub(guarded: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(guarded.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _infer_request(model: str = "identity") -> pb.ModelInferRequest:
    data = np.arange(3, dtype="<f4")
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 3])
        ],
        raw_input_contents=[data.tobytes()],
    )


def _code(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _details(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value.details()  # type: ignore[no-any-return]


# -- UNAUTHENTICATED ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer hr_not-a-token-anyone-was-given"),),
        (("authorization", f"bearer {READER}"),),
    ],
    ids=["missing", "basic", "empty", "unknown", "lowercase-scheme"],
)
def test_missing_or_invalid_token_is_unauthenticated(stub, metadata) -> None:
    for call, request in (
        (stub.ModelInfer, _infer_request()),
        (stub.ServerMetadata, pb.ServerMetadataRequest()),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="identity")),
        (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
    ):
        assert _code(call, request, metadata=metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_details_say_what_to_send(stub) -> None:
    assert "authorization: Bearer <token>" in _details(stub.ModelInfer, _infer_request())
    assert _details(stub.ModelInfer, _infer_request(), metadata=_bearer("nope")) == (
        "invalid bearer token"
    )


def test_stream_without_token_is_unauthenticated(stub) -> None:
    replies = stub.ModelStreamInfer(iter([_infer_request()]))
    with pytest.raises(grpc.RpcError) as raised:
        list(replies)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- PERMISSION_DENIED and OK --------------------------------------------------------------


def test_token_uses_its_models(stub) -> None:
    reply = stub.ModelInfer(_infer_request("identity"), metadata=_bearer(READER))
    assert np.frombuffer(reply.raw_output_contents[0], "<f4").tolist() == [0, 1, 2]
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="scaled"), metadata=_bearer(READER))
    assert stub.ModelConfig(pb.ModelConfigRequest(name="identity"), metadata=_bearer(READER))
    ready = stub.ModelReady(pb.ModelReadyRequest(name="identity"), metadata=_bearer(READER))
    assert ready.ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=_bearer(READER)).name


@pytest.mark.parametrize("model", ["sales_forecast", "echo_fp32", "no_such_model"])
def test_other_models_are_permission_denied(stub, model: str) -> None:
    """A model outside the token's scope is refused whether it exists or not."""
    bearer = _bearer(READER)
    for call, request in (
        (stub.ModelInfer, _infer_request(model)),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=model)),
        (stub.ModelReady, pb.ModelReadyRequest(name=model)),
        (stub.ModelConfig, pb.ModelConfigRequest(name=model)),
    ):
        assert _code(call, request, metadata=bearer) == grpc.StatusCode.PERMISSION_DENIED
    details = _details(stub.ModelInfer, _infer_request(model), metadata=bearer)
    assert details == (
        f"token 'reader' may not use model '{model}' (its `models` in server.auth do not cover it)"
    )


def test_globs_scope_models(stub) -> None:
    bearer = _bearer(GLOBBER)
    assert _code(stub.ModelInfer, _infer_request("echo_fp32"), metadata=bearer) == (
        grpc.StatusCode.OK
    )
    assert _code(stub.ModelInfer, _infer_request("identity"), metadata=bearer) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_stream_checks_every_message(stub) -> None:
    requests = [_infer_request("identity"), _infer_request("sales_forecast")]
    requests += [_infer_request("identity")]
    for index, request in enumerate(requests):
        request.id = str(index)
    replies = {
        reply.infer_response.id: reply
        for reply in stub.ModelStreamInfer(iter(requests), metadata=_bearer(READER))
    }
    assert not replies["0"].error_message
    assert not replies["2"].error_message
    assert replies["1"].error_message == (
        "token 'reader' may not use model 'sales_forecast' "
        "(its `models` in server.auth do not cover it)"
    )


def test_admin_methods_need_an_admin_token(stub) -> None:
    for token in (READER, GLOBBER):
        for call, request in (
            (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
            (stub.ModelStatistics, pb.ModelStatisticsRequest(name="identity")),
            (stub.ModelStatistics, pb.ModelStatisticsRequest()),
        ):
            assert _code(call, request, metadata=_bearer(token)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
    assert "admin method" in _details(
        stub.RepositoryIndex, pb.RepositoryIndexRequest(), metadata=_bearer(READER)
    )
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=_bearer(OPS))
    assert "identity" in {model.name for model in index.models}
    assert stub.ModelStatistics(pb.ModelStatisticsRequest(), metadata=_bearer(OPS)).model_stats
    # Admin is not a model scope: ops has no models.
    assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(OPS)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


# -- open methods ------------------------------------------------------------------------


def test_health_is_open_and_reflection_closed_by_default(guarded: ServerThread, stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    with grpc.insecure_channel(guarded.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert _reflection_code(channel, ()) == grpc.StatusCode.UNAUTHENTICATED
        assert _reflection_code(channel, _bearer(READER)) == grpc.StatusCode.OK


def _reflection_code(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5))
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_health_closed_and_reflection_open_by_config(tokens_file: Path) -> None:
    settings = _auth_settings(tokens_file, open_health=False, open_reflection=True)
    with ServerThread(settings) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(stub.ServerLive, pb.ServerLiveRequest()) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        assert _code(health.Check, health_pb2.HealthCheckRequest()) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(health.Check, health_pb2.HealthCheckRequest(), metadata=_bearer(OPS)) == (
            grpc.StatusCode.OK
        )
        assert _reflection_code(channel, ()) == grpc.StatusCode.OK


# -- tokens file and reload ------------------------------------------------------------------


def test_tokens_file_is_read_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump([_entry("filed", FILED, models=["identity"])]))
    with ServerThread(_auth_settings(path)) as server, grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(FILED)) == (
            grpc.StatusCode.OK
        )
        assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(LATE)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # SIGHUP: the file now holds only `late`; `filed` is revoked.
        path.write_text(yaml.safe_dump([_entry("late", LATE, models=["*"])]))
        server.application.reload()
        assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(LATE)) == (
            grpc.StatusCode.OK
        )
        assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(FILED)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # A broken file keeps the tokens known so far.
        path.write_text("- {name: late}\n")
        server.application.reload()
        assert _code(stub.ModelInfer, _infer_request(), metadata=_bearer(LATE)) == (
            grpc.StatusCode.OK
        )


# -- identity: in the request's context, in spans, never the token in logs ------------------


def test_current_identity_is_the_token_name(stub) -> None:
    reply = stub.ModelInfer(_infer_request("whoami"), metadata=_bearer(READER))
    assert reply.raw_output_contents[0] == len(b"reader").to_bytes(4, "little") + b"reader"


def test_spans_carry_the_identity_not_the_token(tmp_path: Path, tokens_file: Path) -> None:
    with OtlpReceiver() as receiver:
        tree = _auth_settings(tokens_file).model_dump(mode="json")
        tree["tracing"] = {
            "exporter": "otlp_grpc",
            "endpoint": receiver.endpoint,
            "export_delay_ms": 50,
        }
        with (
            ServerThread(Settings.model_validate(tree)) as server,
            grpc.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(_infer_request(), metadata=_bearer(READER))
            _code(stub.ModelInfer, _infer_request(), metadata=_bearer("wrong"))
        spans = receiver.named("inference.GRPCInferenceService/ModelInfer")
    assert len(spans) == 2
    identities = sorted(str(span.attributes.get(IDENTITY_ATTRIBUTE)) for span in spans)
    assert identities == ["None", "reader"]
    refused = next(span for span in spans if IDENTITY_ATTRIBUTE not in span.attributes)
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert READER not in repr(spans)


def test_tokens_never_reach_the_logs(
    guarded: ServerThread, stub, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    handler = log_handler(LoggingSettings(level="DEBUG", format="json"), stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            for token in (READER, OPS, "hr_wrong-token-value", FILED):
                for call, request in (
                    (stub.ModelInfer, _infer_request("identity")),
                    (stub.ModelInfer, _infer_request("sales_forecast")),
                    (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
                ):
                    _code(call, request, metadata=_bearer(token))
            guarded.application.reload()
    finally:
        root.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any("refused" in record["message"] for record in records)  # the calls were logged
    for token in (READER, OPS, "hr_wrong-token-value", FILED):
        assert token not in caplog.text
        assert token not in stream.getvalue()


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@settings(max_examples=60, deadline=None, database=None)
@given(value=_header_text | _header_text.map(lambda text: f"Bearer {text}"))
def test_any_other_authorization_is_unauthenticated(guarded: ServerThread, value: str) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("authorization", value),)
        assert _code(stub.ModelInfer, _infer_request(), metadata=metadata) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.ModelInfer(_infer_request(), metadata=_bearer(READER)).raw_output_contents


def test_unreadable_tokens_file_stops_start_up(tmp_path: Path) -> None:
    from headrace.errors import ConfigError

    with (
        pytest.raises(ConfigError, match=r"server\.auth\.tokens_file: cannot read .*missing"),
        ServerThread(_auth_settings(tmp_path / "missing.yaml")),
    ):
        pass
