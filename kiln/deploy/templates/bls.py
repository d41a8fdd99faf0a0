"""kiln deploy's single-model alternative to the ensemble (Triton Python backend, decoupled): the same inputs and
outputs, with the pipeline written as code, as TensorRT-LLM's ``tensorrt_llm_bls``. It calls ``preprocessing``,
then the kiln model (parameter ``llm_model_name``) and streams each of its responses through ``postprocessing``,
through Triton's BLS API (``pb_utils.InferenceRequest(...).exec``). Change the flow here: a retry, a filter, a
second model."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

# The ensemble's inputs the kiln model reads under the same name (the rest come from preprocessing).
PASSED_ON = ("max_tokens", "stream", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "min_tokens", "stop_words", "bad_words", "end_id", "pad_id",
             "return_log_probs")
LLM_OUTPUTS = ["output_ids", "sequence_length", "context_ids", "cum_log_probs", "output_log_probs", "batch_index"]


class StepFailed(Exception):
    def __init__(self, error):
        super().__init__(error.message())
        self.error = error


def _checked(response):
    if response.has_error():
        raise StepFailed(response.error())
    return response


def _output(response, name):
    return pb_utils.get_output_tensor_by_name(response, name).as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.llm = params["llm_model_name"]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.serve(request, sender)
            except StepFailed as e:
                sender.send(pb_utils.InferenceResponse(error=e.error),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def serve(self, request, sender):
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        pre = _checked(pb_utils.InferenceRequest(
            model_name="preprocessing", requested_output_names=["INPUT_ID", "REQUEST_INPUT_LEN"],
            inputs=[pb_utils.Tensor("QUERY", text.as_numpy())]).exec())
        inputs = [pb_utils.Tensor("input_ids", _output(pre, "INPUT_ID")),
                  pb_utils.Tensor("input_lengths", _output(pre, "REQUEST_INPUT_LEN"))]
        for name in PASSED_ON:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
        wanted = request.requested_output_names()
        llm = pb_utils.InferenceRequest(model_name=self.llm, requested_output_names=LLM_OUTPUTS, inputs=inputs)
        for response in llm.exec(decoupled=True):
            _checked(response)
            if not response.output_tensors():
                continue  # the final flag alone
            post = _checked(pb_utils.InferenceRequest(
                model_name="postprocessing", requested_output_names=["OUTPUT"],
                inputs=[pb_utils.Tensor("TOKENS_BATCH", _output(response, "output_ids")),
                        pb_utils.Tensor("SEQUENCE_LENGTH", _output(response, "sequence_length")),
                        pb_utils.Tensor("CONTEXT_IDS", _output(response, "context_ids"))]).exec())
            outputs = {"text_output": _output(post, "OUTPUT"),
                       "cum_log_probs": _output(response, "cum_log_probs"),
                       "output_log_probs": _output(response, "output_log_probs"),
                       "batch_index": _output(response, "batch_index")}
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.asarray(value)) for name, value in outputs.items()
                if not wanted or name in wanted]))
