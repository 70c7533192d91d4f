"""A model's capture rules applied to a spooled record before it is stored: tensors dropped,
values hashed (PII). Runs on the capture stage's thread, never on the request path.

Hashes are `sha256(salt + value)` in lowercase hex: stable for one salt, so hashed values can
still be joined and counted, but not read back. The salt comes from the environment
(HEADRACE_CAPTURE_HASH_SALT), never from a config file.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from headrace.capture.record import CaptureRecord, ParameterValue
from headrace.config import ModelCaptureSettings
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol.converters import decode_bytes_elements, encode_bytes_elements


class CaptureRules:
    """One model's `drop` and `hash` settings, ready to apply."""

    __slots__ = (
        "_drop_inputs",
        "_drop_outputs",
        "_hash_headers",
        "_hash_inputs",
        "_hash_parameters",
        "_salt",
    )

    def __init__(self, settings: ModelCaptureSettings, salt: bytes) -> None:
        self._salt = salt
        self._drop_inputs = _names(settings.drop, "inputs")
        self._drop_outputs = _names(settings.drop, "outputs")
        self._hash_headers = _names(settings.hash, "headers")
        self._hash_parameters = _names(settings.hash, "parameters")
        self._hash_inputs = _names(settings.hash, "inputs")

    @property
    def changes_anything(self) -> bool:
        return bool(
            self._drop_inputs
            or self._drop_outputs
            or self._hash_headers
            or self._hash_parameters
            or self._hash_inputs
        )

    def hash(self, value: bytes) -> str:
        return hashlib.sha256(self._salt + value).hexdigest()

    def apply(self, record: CaptureRecord) -> CaptureRecord:
        """The record as it may be stored. Raises google.protobuf DecodeError for request or
        response bytes that are not their message (never the case for spooled records)."""
        if not self.changes_anything:
            return record
        headers = {
            key: self.hash(value.encode()) if key in self._hash_headers else value
            for key, value in record.headers.items()
        }
        parameters: dict[str, ParameterValue] = {
            key: self.hash(str(value).encode()) if key in self._hash_parameters else value
            for key, value in record.parameters.items()
        }
        request, response = record.request, record.response
        if request and (self._drop_inputs or self._hash_inputs or self._hash_parameters):
            request = self._request(request)
        if response and self._drop_outputs:
            response = self._response(response)
        return dataclasses.replace(
            record, headers=headers, parameters=parameters, request=request, response=response
        )

    def _request(self, data: bytes) -> bytes:
        message = pb.ModelInferRequest.FromString(data)
        for key in self._hash_parameters & set(message.parameters):
            value = message.parameters[key]
            choice = value.WhichOneof("parameter_choice")
            plain = str(getattr(value, choice)) if choice is not None else ""
            message.parameters[key].CopyFrom(
                pb.InferParameter(string_param=self.hash(plain.encode()))
            )
        raw = message.raw_input_contents
        for index in reversed(range(len(message.inputs))):
            tensor = message.inputs[index]
            if tensor.name in self._drop_inputs:
                del message.inputs[index]
                if index < len(raw):
                    del raw[index]
            elif tensor.name in self._hash_inputs and tensor.datatype == "BYTES":
                if index < len(raw):
                    count = int(np.prod(tensor.shape))
                    elements = decode_bytes_elements(tensor.name, raw[index], count)
                    raw[index] = encode_bytes_elements(
                        np.array([self.hash(element).encode() for element in elements], object)
                    )
                else:
                    hashed = [
                        self.hash(element).encode() for element in tensor.contents.bytes_contents
                    ]
                    del tensor.contents.bytes_contents[:]
                    tensor.contents.bytes_contents.extend(hashed)
        return message.SerializeToString()

    def _response(self, data: bytes) -> bytes:
        message = pb.ModelInferResponse.FromString(data)
        raw = message.raw_output_contents
        for index in reversed(range(len(message.outputs))):
            if message.outputs[index].name in self._drop_outputs:
                del message.outputs[index]
                if index < len(raw):
                    del raw[index]
        return message.SerializeToString()


def _names(items: tuple[str, ...], kind: str) -> frozenset[str]:
    prefix = f"{kind}."
    return frozenset(item[len(prefix) :] for item in items if item.startswith(prefix))
