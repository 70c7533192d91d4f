"""The committed stubs are what `make proto` generates, and the protocol is wire-compatible
with Triton's: every message, field and method Headrace declares matches Triton's own
descriptors (as shipped in tritonclient) by name, number, type and label."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import model_config_pb2 as config_pb

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DIR = ROOT / "server" / "headrace" / "protocol"


def test_committed_stubs_match_make_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate_python.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = {path.name: path.read_text() for path in tmp_path.iterdir()}
    committed = {
        path.name: path.read_text() for path in PROTOCOL_DIR.iterdir() if "_pb2" in path.name
    }
    assert sorted(generated) == sorted(committed), "run `make proto`"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit the result"


def _compare_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    for value in ours.values:
        assert theirs.values_by_name[value.name].number == value.number, value.full_name


def _compare_message(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{field.full_name} is not in Triton's proto"
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), field.full_name
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name
        if field.enum_type is not None:
            assert field.enum_type.full_name == other.enum_type.full_name
        if field.containing_oneof is not None:
            assert other.containing_oneof is not None
            assert field.containing_oneof.name == other.containing_oneof.name
    for nested in ours.nested_types:
        _compare_message(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        _compare_enum(enum, theirs.enum_types_by_name[enum.name])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(config_pb.DESCRIPTOR, triton_config_pb.DESCRIPTOR), (pb.DESCRIPTOR, triton_pb.DESCRIPTOR)],
)
def test_wire_compatible_with_triton(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    assert ours.package == theirs.package == "inference"
    for name, message in ours.message_types_by_name.items():
        _compare_message(message, theirs.message_types_by_name[name])
    for name, enum in ours.enum_types_by_name.items():
        _compare_enum(enum, theirs.enum_types_by_name[name])
    for name, service in ours.services_by_name.items():
        triton_service = theirs.services_by_name[name]
        for method in service.methods:
            other = triton_service.methods_by_name[method.name]
            assert method.input_type.full_name == other.input_type.full_name
            assert method.output_type.full_name == other.output_type.full_name
            assert (method.client_streaming, method.server_streaming) == (
                other.client_streaming,
                other.server_streaming,
            )


def test_required_methods_are_declared() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name)
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
    } <= methods


def test_stubs_do_not_touch_the_default_pool() -> None:
    from google.protobuf import descriptor_pool

    found = descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
    assert found.file.name == triton_pb.DESCRIPTOR.name
    assert found is not pb.ModelInferRequest.DESCRIPTOR
