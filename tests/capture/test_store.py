"""Object stores: a local folder, and S3 against a real SeaweedFS."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from headrace.capture.store import LocalStore, ObjectStore, S3Store, make_store
from headrace.config import CaptureStoreSettings, LocalStoreSettings, S3StoreSettings
from headrace.errors import ObjectStoreAccessError, ObjectStoreError
from headrace.launchers.seaweedfs import SeaweedFS

MULTIPART_BYTES = 11 * 1024 * 1024  # past pyarrow's part size: a multipart upload


def unique_prefix() -> str:
    return f"test-store-{uuid.uuid4().hex[:8]}"


def check_put_list_get(store: ObjectStore) -> None:
    store.put("a/x.bin", b"first")
    store.put("a/b/y.bin", b"\x00" * 10)
    store.put("c.bin", b"")
    store.put("a/x.bin", b"replaced")
    assert list(store.list()) == [("a/b/y.bin", 10), ("a/x.bin", 8), ("c.bin", 0)]
    assert list(store.list("a/b")) == [("a/b/y.bin", 10)]
    assert list(store.list("nothing/here")) == []
    assert store.get("a/x.bin") == b"replaced"
    assert store.get("c.bin") == b""
    with pytest.raises(ObjectStoreError, match=r"missing\.bin"):
        store.get("missing.bin")


def test_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "captures")
    check_put_list_get(store)
    assert (tmp_path / "captures" / "a" / "x.bin").read_bytes() == b"replaced"


def test_local_store_never_lists_a_file_being_written(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/x.bin", b"1")
    # What a put interrupted by a crash leaves behind.
    (tmp_path / "a" / ".y.bin.0123.tmp").write_bytes(b"half")
    assert list(store.list()) == [("a/x.bin", 1)]


def test_local_store_refuses_paths_outside_its_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.\."):
        LocalStore(tmp_path).put("../escape.bin", b"1")


def test_local_store_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ObjectStoreError, match="cannot write"):
        LocalStore(tmp_path / "file").put("x.bin", b"1")


def test_s3_store(seaweedfs: SeaweedFS) -> None:
    check_put_list_get(seaweedfs.store(unique_prefix()))


def test_s3_store_multipart_upload(seaweedfs: SeaweedFS) -> None:
    store = seaweedfs.store(unique_prefix())
    data = os.urandom(MULTIPART_BYTES)
    store.put("big.bin", data)
    assert list(store.list()) == [("big.bin", MULTIPART_BYTES)]
    assert store.get("big.bin") == data


def test_small_files_are_one_put_and_large_ones_multipart(seaweedfs: SeaweedFS) -> None:
    # The refusal names the request that was refused: the first one of each kind of upload.
    store = S3Store(
        seaweedfs.bucket,
        endpoint=seaweedfs.endpoint,
        scheme="http",
        access_key=seaweedfs.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(ObjectStoreAccessError, match="uploading object"):
        store.put("small.bin", b"1" * 1024)
    with pytest.raises(ObjectStoreAccessError, match="multiple part upload"):
        store.put("big.bin", b"1" * MULTIPART_BYTES)


def test_s3_credentials_come_from_the_aws_environment(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in seaweedfs.environ().items():
        monkeypatch.setenv(name, value)
    settings = TypeAdapter(CaptureStoreSettings).validate_python(
        {
            "kind": "s3",
            "bucket": seaweedfs.bucket,
            "prefix": unique_prefix(),
            "endpoint": seaweedfs.endpoint,
            "scheme": "http",
        }
    )
    store = make_store(settings)
    store.put("x.bin", b"from the chain")
    assert store.get("x.bin") == b"from the chain"


def test_wrong_credentials_are_refused_at_once(seaweedfs: SeaweedFS) -> None:
    store = S3Store(
        seaweedfs.bucket,
        endpoint=seaweedfs.endpoint,
        scheme="http",
        access_key=seaweedfs.access_key,
        secret_key="not-the-secret",
        max_attempts=50,
    )
    with pytest.raises(ObjectStoreAccessError, match=r"refused.*AWS_ACCESS_KEY_ID"):
        store.put("x.bin", b"1")
    with pytest.raises(ObjectStoreAccessError):
        list(store.list())


def test_retries_exhausted_while_the_store_is_down(seaweedfs: SeaweedFS) -> None:
    store = seaweedfs.store(unique_prefix(), max_attempts=3, initial_backoff_s=0.01)
    seaweedfs.stop()
    try:
        with pytest.raises(ObjectStoreError, match="failed 3 times") as failure:
            store.put("x.bin", b"1")
        assert not isinstance(failure.value, ObjectStoreAccessError)
    finally:
        seaweedfs.start()
    store.put("x.bin", b"1")
    assert store.get("x.bin") == b"1"


def test_closed_store_gives_up(seaweedfs: SeaweedFS) -> None:
    store = seaweedfs.store(unique_prefix())
    store.close()
    with pytest.raises(ObjectStoreError, match="closed"):
        store.put("x.bin", b"1")


def test_store_settings() -> None:
    adapter: TypeAdapter[CaptureStoreSettings] = TypeAdapter(CaptureStoreSettings)
    local = adapter.validate_python({"path": "/tmp/captures"})
    assert isinstance(local, LocalStoreSettings)
    assert isinstance(make_store(local), LocalStore)
    s3 = adapter.validate_python({"kind": "s3", "bucket": "b", "prefix": "p"})
    assert isinstance(s3, S3StoreSettings)
    assert s3.scheme == "https"
    assert s3.endpoint is None
    with pytest.raises(ValidationError, match="never read from the config"):
        adapter.validate_python({"kind": "s3", "bucket": "b", "secret_key": "leak"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "s3", "bucket": "b/c"})
