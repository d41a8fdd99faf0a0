"""kiln deploy's preprocessing model (Triton Python backend): QUERY (the prompt text) -> INPUT_ID (its token ids,
padded with 0 to the longest of the batch) and REQUEST_INPUT_LEN (each row's real length), tokenized with the
engine's own tokenizer (``tokenizer.json`` in the folder parameter ``tokenizer_dir`` names, relative to this
model's folder). Parameter ``add_bos_token`` "true" puts ``bos_token_id`` first where the tokenizer did not."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        import json

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], params["tokenizer_dir"])
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.bos = int(params["bos_token_id"]) if params.get("add_bos_token") == "true" else None

    def encode(self, text: str) -> list:
        ids = self.tokenizer.encode(text).ids
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        return ids

    def execute(self, requests):
        responses = []
        for request in requests:
            queries = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy()
            try:
                rows = [self.encode(q.decode("utf-8")) for q in queries.reshape(len(queries), -1)[:, 0]]
            except UnicodeDecodeError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"QUERY must be UTF-8 text: {e}", pb_utils.TritonError.INVALID_ARG)))
                continue
            width = max(len(r) for r in rows)
            ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)
            lengths = np.array([[len(r)] for r in rows], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("INPUT_ID", ids), pb_utils.Tensor("REQUEST_INPUT_LEN", lengths)]))
        return responses
