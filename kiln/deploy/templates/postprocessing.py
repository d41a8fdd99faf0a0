"""kiln deploy's postprocessing model (Triton Python backend): TOKENS_BATCH (a response's new token ids, [batch,
beam, tokens]) with SEQUENCE_LENGTH (the real tokens of each row) -> OUTPUT (their text), decoded with the
engine's own tokenizer (``tokenizer.json`` in the folder parameter ``tokenizer_dir`` names).

Streamed, each response brings only its new tokens, and a token decoded alone loses its leading space (a
SentencePiece "▁word") or is part of a character (byte tokens). CONTEXT_IDS (the kiln model's ``context_ids``:
the tokens before these, -1 where there are none) fixes both without keeping state between requests: decode the
context with the new tokens, and keep what follows the context's own text. A character whose bytes are not all
here yet is left for the next response, whose context holds its first bytes."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

INCOMPLETE = "\ufffd"  # what the decoder gives for a character whose bytes are not all there


class TritonPythonModel:
    def initialize(self, args):
        import json

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], params["tokenizer_dir"])
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.skip_special = params.get("skip_special_tokens", "true") == "true"

    def decode(self, context: list, tokens: list) -> str:
        before = self.tokenizer.decode(context, skip_special_tokens=self.skip_special).rstrip(INCOMPLETE)
        text = self.tokenizer.decode(context + tokens, skip_special_tokens=self.skip_special).rstrip(INCOMPLETE)
        if text.startswith(before):
            return text[len(before):]
        return text[len(os.path.commonprefix([before, text])):]  # a decoder that rewrote the context's text

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            context = pb_utils.get_input_tensor_by_name(request, "CONTEXT_IDS")
            context = context.as_numpy() if context is not None else np.full(tokens.shape[:2] + (0,), -1)
            out = np.empty(tokens.shape[:2], dtype=object)
            for b in range(tokens.shape[0]):
                for beam in range(tokens.shape[1]):
                    real = tokens[b, beam, :lengths[b, beam]].tolist()
                    before = [t for t in context[b, beam].tolist() if t >= 0]
                    out[b, beam] = self.decode(before, real).encode("utf-8")
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
