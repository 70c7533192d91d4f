"""Triton python-backend model: FEATURES [batch, 6] -> FORECAST [batch, 1].

The same float32 math as headrace.examples.sales_forecast.SalesForecast, which cannot be
imported here: this repository runs in NVIDIA's Triton container, where Headrace is not
installed. The requests of one call run as one batch through the network.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        weights_file = config["parameters"]["weights_file"]["string_value"]
        version_directory = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_directory, weights_file)) as file:
            weights = json.load(file)
        self.mean = np.asarray(weights["feature_mean"], dtype=np.float32)
        self.scale = np.asarray(weights["feature_scale"], dtype=np.float32)
        self.hidden_weights = np.asarray(weights["hidden_weights"], dtype=np.float32)
        self.hidden_bias = np.asarray(weights["hidden_bias"], dtype=np.float32)
        self.output_weights = np.asarray(weights["output_weights"], dtype=np.float32)
        self.output_bias = np.float32(weights["output_bias"])

    def execute(self, requests):
        features = [
            pb_utils.get_input_tensor_by_name(request, "FEATURES").as_numpy()
            for request in requests
        ]
        standardized = (np.concatenate(features) - self.mean) / self.scale
        hidden = np.maximum(standardized @ self.hidden_weights + self.hidden_bias, 0)
        forecast = hidden @ self.output_weights + self.output_bias
        forecast = np.maximum(forecast, 0).reshape(-1, 1).astype(np.float32)
        boundaries = np.cumsum([len(rows) for rows in features])[:-1]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("FORECAST", rows.copy())])
            for rows in np.split(forecast, boundaries)
        ]
