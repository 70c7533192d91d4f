"""Call Headrace with the stubs generated from proto/ (grpc.aio, typed), raw tensor contents.

python clients/python/infer_async_stubs.py --url localhost:8800
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import grpc_service_pb2_grpc as pb_grpc


async def infer_identity(url: str, values: np.ndarray) -> np.ndarray:
    """Send one FP32 batch to the identity model and decode OUTPUT0."""
    request = pb.ModelInferRequest(
        model_name="identity",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=list(values.shape)
            )
        ],
        raw_input_contents=[values.astype("<f4").tobytes()],
    )
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(request, timeout=5)
    output = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(output.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8800", help="Headrace gRPC address")
    arguments = parser.parse_args()
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    print(asyncio.run(infer_identity(arguments.url, values)).tolist())


if __name__ == "__main__":
    main()
