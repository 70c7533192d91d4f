"""Triton python-backend model that behaves like a GPU kernel: OUTPUT0 = INPUT0, after a fixed
launch cost plus a small cost per batch item, paid once per call whatever the batch.

All requests handed to one `execute` call are one kernel launch: with Triton's dynamic batcher
on (gpu_sim_triton_batched) Triton merges requests; with it off (gpu_sim) each call carries one
request, so only a batching gateway in front can amortize the launch cost. The costs come
from config.pbtxt parameters `launch_delay_us` and `per_item_delay_us`.
"""

import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.launch_delay_s = float(parameters["launch_delay_us"]["string_value"]) / 1e6
        self.per_item_delay_s = float(parameters["per_item_delay_us"]["string_value"]) / 1e6

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        items = sum(len(batch) for batch in inputs)
        # Sleep, not spin: a GPU kernel leaves the CPU free, and so must its stand-in.
        time.sleep(self.launch_delay_s + items * self.per_item_delay_s)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]) for x in inputs]
