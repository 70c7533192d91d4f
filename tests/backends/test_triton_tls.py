"""TLS and mutual TLS from Headrace to a real tritonserver (`--grpc-use-ssl-mutual`), with
certificates made in the test: the right CA, client certificate and server name reach it; a
wrong CA, a missing client certificate or a name mismatch stop start-up with the reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from headrace.config import Settings
from headrace.errors import StartupError
from headrace.launchers.triton import TritonServer, example_repository
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.certificates import Authority, write_issued
from tests.conftest import ServerThread

SERVER_NAME = "triton.internal"
"""The only name in Triton's certificate: reaching 127.0.0.1 needs `server_name`."""


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.authority = Authority("triton test CA")
        self.ca_file = folder / "ca.crt"
        self.ca_file.write_bytes(self.authority.pem)
        self.server_cert, self.server_key = write_issued(
            folder,
            self.authority.issue("triton", server=True, dns_names=(SERVER_NAME,), ip_addresses=()),
            "triton",
        )
        self.client_cert, self.client_key = write_issued(
            folder, self.authority.issue("headrace", server=False), "headrace"
        )
        stranger = Authority("someone else")
        self.other_ca_file = folder / "other-ca.crt"
        self.other_ca_file.write_bytes(stranger.pem)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("triton-pki"))


@pytest.fixture(scope="module")
def tls_triton(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("triton-tls-models")
    shutil.copytree(example_repository() / "identity", repository / "identity")
    credentials = grpc.ssl_channel_credentials(
        pki.ca_file.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    server = TritonServer(
        repository,
        extra_arguments=[
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={pki.server_cert}",
            f"--grpc-server-key={pki.server_key}",
            f"--grpc-root-cert={pki.ca_file}",
        ],
        credentials=credentials,
        server_name=SERVER_NAME,
    )
    server.start()
    yield server
    server.stop()


def _settings(triton: TritonServer, tls: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "triton": {"startup_timeout_s": 1.5, "tls": tls},
            "models": [
                {
                    "name": "identity",
                    "backend": "triton",
                    "endpoints": [triton.address],
                    "batching": {"enabled": False},
                }
            ],
        }
    )


def _right_tls(pki: Pki, **changes: Any) -> dict[str, Any]:
    tls = {
        "ca_file": str(pki.ca_file),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
        "server_name": SERVER_NAME,
    }
    tls.update(changes)
    return {key: value for key, value in tls.items() if value is not None}


def test_headrace_reaches_triton_over_mutual_tls(tls_triton: TritonServer, pki: Pki) -> None:
    with (
        ServerThread(_settings(tls_triton, _right_tls(pki))) as gateway,
        grpc.insecure_channel(gateway.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        data = np.arange(4, dtype="<f4").reshape(1, 4)
        reply = stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="identity",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="INPUT0", datatype="FP32", shape=[1, 4]
                    )
                ],
                raw_input_contents=[data.tobytes()],
            ),
            timeout=30,
        )
        assert np.frombuffer(reply.raw_output_contents[0], "<f4").tolist() == [0, 1, 2, 3]


def test_plaintext_to_a_tls_triton_stops_start_up(tls_triton: TritonServer) -> None:
    settings = _settings(tls_triton, {}).model_dump(mode="json")
    settings["triton"]["tls"] = None
    with (
        pytest.raises(StartupError, match="no endpoint described it"),
        ServerThread(Settings.model_validate(settings)),
    ):
        pass


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ca_file": "other"}, "CERTIFICATE_VERIFY_FAILED"),
        ({"cert_file": None, "key_file": None}, "Socket closed"),
        ({"server_name": None}, "Hostname Verification Check failed"),
    ],
    ids=["wrong-ca", "no-client-certificate", "name-mismatch"],
)
def test_untrusted_tls_stops_start_up_with_the_reason(
    tls_triton: TritonServer, pki: Pki, change: dict[str, Any], reason: str
) -> None:
    if change.get("ca_file") == "other":
        change = {"ca_file": str(pki.other_ca_file)}
    settings = _settings(tls_triton, _right_tls(pki, **change))
    with pytest.raises(StartupError) as raised, ServerThread(settings):
        pass
    message = str(raised.value)
    assert "model 'identity': no endpoint described it within 1.5 s" in message
    assert tls_triton.address in message
    assert reason in message


def test_unreadable_ca_file_stops_start_up(tls_triton: TritonServer, pki: Pki) -> None:
    settings = _settings(tls_triton, _right_tls(pki, ca_file=str(pki.folder / "missing.crt")))
    with (
        pytest.raises(StartupError, match=r"triton tls\.ca_file: cannot read .*missing\.crt"),
        ServerThread(settings),
    ):
        pass
