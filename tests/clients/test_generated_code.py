"""No client commits generated code, so none can go stale: the Node client builds its service
from proto/ at run time and the C++ build generates its stubs from proto/ into the build
directory. These tests hold both to that: if a client started loading a copy of the protocol,
or the C++ build stopped regenerating when proto/ changes, they fail."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.descriptor_pb2 import FieldDescriptorProto

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import model_config_pb2 as config_pb
from tests.clients.conftest import CPP_BUILD, CPP_CLIENT, NODE_CLIENT, PROTO_DIR, ROOT

pytestmark = pytest.mark.timeout(900)

# What protoc and its plugins write for JavaScript, TypeScript, C++ and Python.
GENERATED_NAME = re.compile(
    r"(_pb\.(js|d\.ts|ts)|_grpc_pb\.(js|d\.ts)|\.pb\.(h|cc)|_pb2(_grpc)?\.pyi?)$"
)

# The service and every message and enum of proto/, as the Node client sees them: proto-loader's
# package definition, reduced to names and numbers.
NODE_PROTOCOL = """
import { loadPackageDefinition, SERVICE_PROTO } from "./client.js";
const definition = loadPackageDefinition();
const message = (type) => ({
  fields: type.field.map((field) => [field.name, field.number, field.type]),
  // Map entries are named differently by every runtime; the map field itself is in "fields".
  nested: Object.fromEntries(type.nestedType.filter((nested) => !nested.options?.mapEntry)
    .map((nested) => [nested.name, message(nested)])),
  enums: Object.fromEntries(type.enumType.map((nested) => [nested.name, enumValues(nested)])),
});
const enumValues = (type) => type.value.map((value) => [value.name, value.number]);
const types = {};
let methods = null;
for (const [name, entry] of Object.entries(definition)) {
  if (entry.format === "Protocol Buffer 3 DescriptorProto") {
    types[name] = message(entry.type);
  } else if (entry.format === "Protocol Buffer 3 EnumDescriptorProto") {
    types[name] = { values: enumValues(entry.type) };
  } else {
    methods = Object.fromEntries(Object.entries(entry).map(([method, call]) => [
      method, [call.path, call.requestStream, call.responseStream],
    ]));
  }
}
console.log(JSON.stringify({ serviceProto: SERVICE_PROTO, methods, types }));
"""


def _message(descriptor: Descriptor) -> dict[str, Any]:
    return {
        "fields": [
            [field.name, field.number, FieldDescriptorProto.Type.Name(field.type)]
            for field in descriptor.fields
        ],
        "nested": {
            nested.name: _message(nested)
            for nested in descriptor.nested_types
            if not nested.GetOptions().map_entry
        },
        "enums": {nested.name: _enum_values(nested) for nested in descriptor.enum_types},
    }


def _enum_values(descriptor: EnumDescriptor) -> list[list[Any]]:
    return [[value.name, value.number] for value in descriptor.values]


def _protocol_from_python_stubs() -> tuple[dict[str, Any], dict[str, Any]]:
    """Methods and types of proto/ from Headrace's stubs (which test_stubs keeps equal to
    what proto/ generates)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {
        method.name: [
            f"/{service.full_name}/{method.name}",
            method.client_streaming,
            method.server_streaming,
        ]
        for method in service.methods
    }
    types: dict[str, Any] = {}
    for module in (pb, config_pb):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            types[message.full_name] = _message(message)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            types[enum.full_name] = {"values": _enum_values(enum)}
    return methods, types


def test_no_client_commits_generated_code() -> None:
    committed = subprocess.run(
        ["git", "ls-files", "--", "clients"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(path.startswith("clients/node/") for path in committed)
    assert any(path.startswith("clients/cpp/") for path in committed)
    generated = [path for path in committed if GENERATED_NAME.search(path)]
    assert not generated, f"generated code is committed (generate it from proto/): {generated}"


def test_node_client_loads_every_method_and_message_from_proto(node_client: Path) -> None:
    result = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_PROTOCOL],
        cwd=node_client,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(result.stdout)
    assert Path(loaded["serviceProto"]) == PROTO_DIR / "grpc_service.proto"
    methods, types = _protocol_from_python_stubs()
    assert loaded["methods"] == methods
    assert loaded["types"] == types


def test_cpp_stubs_are_generated_from_proto_and_newer_than_it(cpp_example: Path) -> None:
    cache = (CPP_BUILD / "CMakeCache.txt").read_text()
    (proto_dir,) = re.findall(r"^HEADRACE_PROTO_DIR:PATH=(.*)$", cache, re.MULTILINE)
    assert (CPP_CLIENT / proto_dir).resolve() == PROTO_DIR
    generated = CPP_BUILD / "generated"
    for proto in ("grpc_service", "model_config"):
        source = PROTO_DIR / f"{proto}.proto"
        for suffix in (".pb.h", ".pb.cc", ".grpc.pb.h", ".grpc.pb.cc"):
            stub = generated / f"{proto}{suffix}"
            # The build just ran: a proto/ file newer than its stubs means the build does not
            # regenerate them when the protocol changes.
            assert stub.stat().st_mtime >= source.stat().st_mtime, f"{stub} is stale"
    header = (generated / "grpc_service.grpc.pb.h").read_text()
    methods, _ = _protocol_from_python_stubs()
    for method in methods:
        assert f" {method}(::grpc::ClientContext* context" in header, method
    assert not list(CPP_CLIENT.glob("*.pb.*")), "stubs belong in the build directory"
    assert cpp_example.is_file()


def test_node_client_has_no_generated_code_beside_it() -> None:
    generated = [
        path
        for path in NODE_CLIENT.rglob("*")
        if "node_modules" not in path.parts and GENERATED_NAME.search(path.name)
    ]
    assert not generated
