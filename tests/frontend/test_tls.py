"""TLS and mutual TLS on the front end, with certificates made in the test: plaintext and
untrusted peers are refused, the right client certificate is accepted, and SIGHUP's reload
changes the certificate for new connections without dropping open ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.certificates import Authority, write_issued
from tests.conftest import ServerThread, make_settings


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority("headrace test CA")


@pytest.fixture
def tls_server(tmp_path: Path, authority: Authority) -> Iterator[tuple[ServerThread, Path]]:
    cert, key = write_issued(tmp_path, authority.issue("headrace", server=True), "server")
    ca = tmp_path / "clients-ca.crt"
    ca.write_bytes(authority.pem)
    settings = make_settings(
        **{"server.tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca)}}
    )
    with ServerThread(settings) as running:
        yield running, tmp_path


def _live(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def test_right_client_certificate_is_accepted(tls_server, authority: Authority) -> None:
    server, _ = tls_server
    client = authority.issue("client", server=False)
    credentials = grpc.ssl_channel_credentials(authority.pem, client.key, client.cert)
    assert _live(server.address, credentials)


def test_plaintext_client_is_refused(tls_server) -> None:
    server, _ = tls_server
    with pytest.raises(grpc.RpcError) as raised:
        _live(server.address, None)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(tls_server, authority: Authority) -> None:
    server, _ = tls_server
    with pytest.raises(grpc.RpcError) as raised:
        _live(server.address, grpc.ssl_channel_credentials(authority.pem))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(tls_server, authority: Authority) -> None:
    server, _ = tls_server
    stranger = Authority("someone else").issue("client", server=False)
    credentials = grpc.ssl_channel_credentials(authority.pem, stranger.key, stranger.cert)
    with pytest.raises(grpc.RpcError) as raised:
        _live(server.address, credentials)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_from_an_untrusted_ca_is_refused(tls_server, authority: Authority) -> None:
    server, _ = tls_server
    client = authority.issue("client", server=False)
    credentials = grpc.ssl_channel_credentials(Authority("other").pem, client.key, client.cert)
    with pytest.raises(grpc.RpcError) as raised:
        _live(server.address, credentials)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tritonclient_over_mutual_tls(tls_server, authority: Authority) -> None:
    server, folder = tls_server
    cert, key = write_issued(folder, authority.issue("client", server=False), "client")
    ca = folder / "server-ca.crt"
    ca.write_bytes(authority.pem)
    client = triton.InferenceServerClient(
        server.address,
        ssl=True,
        root_certificates=str(ca),
        private_key=str(key),
        certificate_chain=str(cert),
    )
    assert client.is_server_ready()


def test_reload_serves_the_new_certificate_and_keeps_open_connections(
    tls_server, authority: Authority
) -> None:
    server, folder = tls_server
    client = authority.issue("client", server=False)
    old_trust = grpc.ssl_channel_credentials(authority.pem, client.key, client.cert)
    with grpc.secure_channel(server.address, old_trust) as open_channel:
        open_stub = pb_grpc.GRPCInferenceServiceStub(open_channel)
        assert open_stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        renewed_by = Authority("renewed server CA")
        write_issued(folder, renewed_by.issue("headrace", server=True), "server")
        server.application.reload_tls()
        # The open connection keeps its session.
        assert open_stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        # New connections get the new certificate: trusted by its CA, not by the old one.
        new_trust = grpc.ssl_channel_credentials(renewed_by.pem, client.key, client.cert)
        assert _live(server.address, new_trust)
        with pytest.raises(grpc.RpcError):
            _live(server.address, old_trust)


def test_unreadable_certificate_stops_start_up(tmp_path: Path) -> None:
    from headrace.errors import StartupError

    settings = make_settings(
        **{
            "server.tls": {
                "cert_file": str(tmp_path / "missing.crt"),
                "key_file": str(tmp_path / "k"),
            }
        }
    )
    with (
        pytest.raises(StartupError, match=r"server\.tls: cannot read .*missing\.crt"),
        ServerThread(settings),
    ):
        pass
