"""Triton python-backend test model: INPUT0[0, 0] picks a TritonError code (0: echo)."""

import triton_python_backend_utils as pb_utils

CODES = {
    1: "NOT_FOUND",
    2: "INVALID_ARG",
    3: "UNAVAILABLE",
    4: "INTERNAL",
}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            code = CODES.get(int(values.flat[0]))
            if code is None:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", values)]))
            else:
                error = pb_utils.TritonError(
                    f"fails_with asked for {code}", getattr(pb_utils.TritonError, code)
                )
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
