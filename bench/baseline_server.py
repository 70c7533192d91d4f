"""A bare grpc.aio server that answers ModelInfer as the `identity` model does.

It is the ceiling Headrace is measured against: the same generated stubs, the same grpc server
options and registered-method dispatch, but no decoding, validation, backend or statistics.
Whatever Headrace costs beyond this is Headrace's own work.

Run: `python -m bench.baseline_server --port 0`; prints `listening on HOST:PORT, ...` once
serving, stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from headrace.config import load_settings
from headrace.protocol import grpc_service_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_VERSION = "1"
"""The version Headrace's `identity` answers with, so both servers send equal bytes."""


def echo_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Each input tensor back as an output (INPUTn -> OUTPUTn), raw contents unchanged."""
    return pb.ModelInferResponse(
        model_name=request.model_name,
        model_version=request.model_version or MODEL_VERSION,
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=tensor.name.replace("INPUT", "OUTPUT", 1),
                datatype=tensor.datatype,
                shape=tensor.shape,
            )
            for tensor in request.inputs
        ],
        raw_output_contents=request.raw_input_contents,
    )


async def _model_infer(
    request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> pb.ModelInferResponse:
    return echo_response(request)


def build_server() -> grpc.aio.Server:
    """The bare server with ModelInfer registered, not yet bound."""
    # Headrace's own defaults, so a change there cannot make the comparison unfair.
    max_message_bytes = load_settings(None).server.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            _model_infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # Headrace registers its methods too (per-call lookup skipped); the baseline must match.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
    return server


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT.

    Raises:
        RuntimeError: the address cannot be bound.
    """
    server = build_server()
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_requested.set)
    await server.start()
    # The same line Headrace logs: the benchmark reads the port from it.
    print(f"listening on {host}:{bound}, serving bare ModelInfer", flush=True)
    try:
        await stop_requested.wait()
    finally:
        await server.stop(grace=1)


def main() -> None:
    """Entry point of `python -m bench.baseline_server`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_server",
        description="A bare grpc.aio server answering ModelInfer as the identity model does.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.host, arguments.port))


if __name__ == "__main__":
    main()
