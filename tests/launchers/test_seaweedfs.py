"""The SeaweedFS launcher: a real S3 store on loopback, stopped and started again on the same
ports and data."""

from __future__ import annotations

import socket
import uuid

import pytest

from headrace.capture.store import S3Store
from headrace.errors import ObjectStoreError, SeaweedFSLaunchError
from headrace.launchers.seaweedfs import GRPC_PORT_OFFSET, SeaweedFS


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_shared_server_serves_its_bucket_with_its_keys(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.running
    assert seaweedfs.s3_port + GRPC_PORT_OFFSET <= 65535
    assert listening(seaweedfs.s3_port)
    prefix = f"test-launcher-{uuid.uuid4().hex[:8]}"
    store = S3Store(
        seaweedfs.bucket,
        prefix=prefix,
        endpoint=seaweedfs.endpoint,
        scheme="http",
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
    )
    store.put("x", b"1")
    assert list(store.list()) == [("x", 1)]


def test_stop_and_start_keep_ports_and_data(seaweedfs: SeaweedFS) -> None:
    store = seaweedfs.store(f"test-launcher-{uuid.uuid4().hex[:8]}", max_attempts=1)
    store.put("kept.bin", b"before the outage")
    port = seaweedfs.s3_port
    seaweedfs.stop()
    try:
        assert not seaweedfs.running
        assert not listening(port)
        with pytest.raises(ObjectStoreError):
            store.get("kept.bin")
    finally:
        seaweedfs.start()
    assert seaweedfs.s3_port == port
    assert store.get("kept.bin") == b"before the outage"


def test_a_weed_that_exits_fails_start_with_its_log() -> None:
    server = SeaweedFS(binary="/bin/false", startup_timeout_s=5)
    with (
        pytest.raises(SeaweedFSLaunchError, match=r"(?s)weed exited with code 1.*last lines of"),
        server,
    ):
        pass
