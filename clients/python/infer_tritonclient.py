"""Forecast a week's sales through Headrace with tritonclient, unchanged.

pip install "tritonclient[grpc]"
python clients/python/infer_tritonclient.py --url localhost:8800
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as triton

# price (EUR), promotion, week of year, store area (m2), last week's units, holiday week
FEATURES = np.array(
    [[4.5, 1, 23, 1200, 60, 0], [9.9, 0, 51, 3500, 40, 1]],
    dtype=np.float32,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8800", help="Headrace gRPC address")
    arguments = parser.parse_args()

    client = triton.InferenceServerClient(arguments.url)
    print("live:", client.is_server_live(), "ready:", client.is_model_ready("sales_forecast"))
    tensor = triton.InferInput("FEATURES", list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES)
    result = client.infer("sales_forecast", [tensor])
    for row, forecast in zip(FEATURES, result.as_numpy("FORECAST")[:, 0], strict=True):
        print(f"features {row.tolist()} -> forecast {forecast:.2f} units")
    client.close()


if __name__ == "__main__":
    main()
