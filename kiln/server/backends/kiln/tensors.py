"""The kiln backend's tensors: the inputs and outputs a client sends and reads, named as in
TensorRT-LLM's Triton models, and the turning of one request's input tensors into generation jobs.

Inputs (all optional but the prompt; one value per batch row unless said):

==========================================  ==========  ======================================================
input (TensorRT-LLM's name too)             type        meaning
==========================================  ==========  ======================================================
``text_input``                              BYTES       the prompt as text (or ``input_ids``)
``input_ids`` ([-1])                        INT32       the prompt as token ids
``input_lengths``                           INT32       how many of a row's ``input_ids`` are real (the rest pad)
``max_tokens`` / ``request_output_len``     INT32       tokens to generate at most (default 16)
``stream`` / ``streaming``                  BOOL        a response per step (decoupled models only)
``temperature``                             FP32        0: greedy
``top_k`` / ``runtime_top_k``               INT32       0: off
``top_p`` / ``runtime_top_p``               FP32        1: off
``min_p``                                   FP32        0: off
``seed`` / ``random_seed``                  UINT64      reproducible sampling
``repetition_penalty``, ``presence_penalty``,
``frequency_penalty``                       FP32
``min_tokens`` / ``min_length``             INT32       tokens to generate before an end token may end it
``stop_words`` ([-1])                       BYTES       stop strings (the text ends before them)
``bad_words`` ([-1])                        BYTES       words never generated (each must be one token)
``end_id``                                  INT32       the token that ends generation, instead of the EOS
``pad_id``                                  INT32       pads ``output_ids`` rows of a batch (default: ``end_id``)
``beam_width``                              INT32       1 only (kiln does not search beams)
``return_log_probs``                        BOOL        fill ``cum_log_probs`` and ``output_log_probs``
``exclude_input_in_output``                 BOOL        default: the model's parameter, else true
``cache_salt``                              BYTES       reuse cached prompt blocks only of requests with this salt
``guided_decoding_guide_type``              BYTES       ``json`` (any object), ``json_schema``, ``regex``,
                                                        ``ebnf_grammar`` (GBNF or Lark) or ``choice``
``guided_decoding_guide``                   BYTES       the schema, regex, grammar or JSON list of choices
==========================================  ==========  ======================================================

Outputs: ``text_output`` (BYTES), ``output_ids`` (INT32 [beam, tokens]), ``sequence_length`` (INT32
[beam]: the real tokens of each ``output_ids`` row), ``context_ids`` (INT32 [beam, tokens]: the up to
``CONTEXT_TOKENS`` tokens before a response's ``output_ids``, the prompt's first, left-padded with -1; a
detokenizer that decodes them with ``output_ids`` and drops their own text gets the text with its leading
space and whole characters: kiln's deployed ``postprocessing`` does), ``cum_log_probs`` (FP32 [beam]),
``output_log_probs`` (FP32 [beam, tokens]) and ``batch_index`` (INT32: the batch row a response belongs
to). ``cum_log_probs`` is 0 and ``output_log_probs`` empty unless ``return_log_probs`` is true.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.runtime import SamplingParams
from kiln.runtime.sampling_params import SamplingParamsError
from kiln.runtime.tokenizer import EngineTokenizer
from kiln.server.config import ModelConfig, mc
from kiln.server.core import InferenceRequest
from kiln.server.errors import ServerError

DEFAULT_MAX_TOKENS = 16
# Tokens of context ``context_ids`` carries: enough for a word's leading space and a character's 4 bytes.
CONTEXT_TOKENS = 8
# Request parameters Triton reserves for itself (the server reads them; they are no input of this backend).
TRITON_PARAMETERS = frozenset({"timeout", "priority", "sequence_id", "sequence_start", "sequence_end", "headers"})
_INT, _FLOAT, _BOOL, _TEXT = "integer", "number", "boolean", "string"
_KINDS = {_INT: "iu", _FLOAT: "fiu", _BOOL: "b", _TEXT: "OSU"}
_CONFIG_TYPES = {_INT: mc.TYPE_INT32, _FLOAT: mc.TYPE_FP32, _BOOL: mc.TYPE_BOOL, _TEXT: mc.TYPE_STRING}


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    kind: str
    list_valued: bool = False  # [-1] per row instead of one value
    param: str | None = None  # the SamplingParams field it sets, or None for inputs read here
    config_type: int | None = None  # the config's data type when it is not the kind's default


INPUTS = [
    Input("text_input", _TEXT),
    Input("input_ids", _INT, list_valued=True),
    Input("input_lengths", _INT),
    Input("max_tokens", _INT, param="max_tokens"),
    Input("request_output_len", _INT, param="max_tokens"),
    Input("stream", _BOOL),
    Input("streaming", _BOOL),
    Input("temperature", _FLOAT, param="temperature"),
    Input("top_k", _INT, param="top_k"),
    Input("runtime_top_k", _INT, param="top_k"),
    Input("top_p", _FLOAT, param="top_p"),
    Input("runtime_top_p", _FLOAT, param="top_p"),
    Input("min_p", _FLOAT, param="min_p"),
    Input("seed", _INT, param="seed", config_type=mc.TYPE_UINT64),
    Input("random_seed", _INT, param="seed", config_type=mc.TYPE_UINT64),
    Input("repetition_penalty", _FLOAT, param="repetition_penalty"),
    Input("presence_penalty", _FLOAT, param="presence_penalty"),
    Input("frequency_penalty", _FLOAT, param="frequency_penalty"),
    Input("min_tokens", _INT, param="min_tokens"),
    Input("min_length", _INT, param="min_tokens"),
    Input("stop_words", _TEXT, list_valued=True),
    Input("bad_words", _TEXT, list_valued=True),
    Input("end_id", _INT),
    Input("pad_id", _INT),
    Input("beam_width", _INT),
    Input("return_log_probs", _BOOL),
    Input("exclude_input_in_output", _BOOL),
    Input("cache_salt", _TEXT, param="cache_salt"),
    Input("guided_decoding_guide_type", _TEXT),
    Input("guided_decoding_guide", _TEXT),
]
# TensorRT-LLM's guide types -> kiln's structured output kinds.
GUIDE_TYPES = {"json": "json_object", "json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar",
               "choice": "choice"}
BY_NAME = {i.name: i for i in INPUTS}
# SamplingParams fields that inputs set through a translation (not as an input's ``param``): the input an
# error on the field names.
DERIVED_FROM = {"stop": "stop_words", "stop_token_ids": "end_id", "ignore_eos": "end_id", "logit_bias": "bad_words",
                "logprobs": "return_log_probs", "structured": "guided_decoding_guide"}
# Output name -> (config type, dims after the batch dimension).
OUTPUTS = {
    "text_output": (mc.TYPE_STRING, [-1]),
    "output_ids": (mc.TYPE_INT32, [-1, -1]),
    "context_ids": (mc.TYPE_INT32, [-1, -1]),
    "sequence_length": (mc.TYPE_INT32, [-1]),
    "cum_log_probs": (mc.TYPE_FP32, [-1]),
    "output_log_probs": (mc.TYPE_FP32, [-1, -1]),
    "batch_index": (mc.TYPE_INT32, [1]),
}


def fill_config(config: ModelConfig) -> None:
    """Write every input into a config that lists no input, and every output into one that lists no output."""
    if not config.input:
        for i in INPUTS:
            config.input.add(name=i.name, data_type=i.config_type or _CONFIG_TYPES[i.kind],
                             dims=[-1] if i.list_valued else [1], optional=True)
    if not config.output:
        for name, (dtype, dims) in OUTPUTS.items():
            config.output.add(name=name, data_type=dtype, dims=dims)


def check_config(config: ModelConfig) -> None:
    """A config.pbtxt that lists its own inputs and outputs may use only names and kinds this backend reads."""
    from kiln.server import datatypes

    for io in config.input:
        spec = BY_NAME.get(io.name)
        if spec is None:
            raise ServerError.invalid(
                f"model '{config.name}': the kiln backend does not read an input named '{io.name}' "
                f"(it reads {', '.join(BY_NAME)})")
        if datatypes.by_config(io.data_type).numpy.kind not in _KINDS[spec.kind]:
            raise ServerError.invalid(
                f"model '{config.name}': input '{io.name}' holds {spec.kind} values, not "
                f"{datatypes.config_name(io.data_type)}")
    for io in config.output:
        if io.name not in OUTPUTS:
            raise ServerError.invalid(
                f"model '{config.name}': the kiln backend does not produce an output named '{io.name}' "
                f"(it produces {', '.join(OUTPUTS)})")
        if io.data_type != OUTPUTS[io.name][0]:
            raise ServerError.invalid(
                f"model '{config.name}': output '{io.name}' is {datatypes.config_name(OUTPUTS[io.name][0])}")


@dataclass(slots=True)
class Job:
    """One batch row of a request: what to generate and how to answer."""

    row: int
    prompt: str | list[int]
    params: SamplingParams
    exclude_input: bool
    return_log_probs: bool
    pad_id: int


@dataclass(slots=True)
class Jobs:
    rows: list[Job]
    stream: bool


def read_jobs(request: InferenceRequest, tokenizer: EngineTokenizer, batched: bool, exclude_input: bool,
              sampling_defaults: dict | None = None) -> Jobs:
    """The request's batch rows as jobs; ServerError (invalid argument) naming the input that is wrong. A
    sampling field no input sets takes its value from ``sampling_defaults`` (the model's), else kiln's."""
    unknown = sorted(set(request.parameters) - TRITON_PARAMETERS)
    if unknown:
        # The generate extension turns the JSON fields that are not inputs into parameters.
        raise ServerError.invalid(
            f"unknown field(s) {', '.join(unknown)}: the kiln backend reads only its inputs ({', '.join(BY_NAME)})")
    rows = max(request.batch_size, 1) if batched else 1
    reader = _Reader(request, batched)
    for name in ("text_input", "input_ids"):
        if name in request.inputs and not request.inputs[name].data.size:
            raise ServerError.invalid(f"input '{name}' is empty")
    if ("text_input" in request.inputs) == ("input_ids" in request.inputs):
        raise ServerError.invalid("a request needs the prompt in exactly one of 'text_input' (text) and "
                                  "'input_ids' (token ids)")
    for a, b in (("max_tokens", "request_output_len"), ("stream", "streaming"), ("top_k", "runtime_top_k"),
                 ("top_p", "runtime_top_p"), ("seed", "random_seed"), ("min_tokens", "min_length")):
        if a in request.inputs and b in request.inputs:
            raise ServerError.invalid(f"inputs '{a}' and '{b}' mean the same; give one of them")
    streams = {reader.scalar(name, row) for name in ("stream", "streaming") if name in request.inputs
               for row in range(rows)}
    if len(streams) > 1:
        raise ServerError.invalid("input 'stream' must be the same for every batch row")
    return Jobs([_job(reader, row, tokenizer, exclude_input, sampling_defaults or {}) for row in range(rows)],
                True in streams)


def _job(reader: _Reader, row: int, tokenizer: EngineTokenizer, exclude_input: bool, defaults: dict) -> Job:
    if "text_input" in reader.request.inputs:
        prompt: str | list[int] = reader.scalar("text_input", row)
    else:
        prompt = reader.values("input_ids", row)
        length = reader.scalar("input_lengths", row, None)
        if length is not None:
            if not 1 <= length <= len(prompt):
                raise ServerError.invalid(
                    f"input 'input_lengths' is {length} but row {row} of 'input_ids' has {len(prompt)} tokens")
            prompt = prompt[:length]
    beam_width = reader.scalar("beam_width", row, 1)
    if beam_width != 1:
        raise ServerError.invalid(
            f"input 'beam_width' is {beam_width}: kiln decodes one sequence per request (beam_width 1); "
            "for several completions use the OpenAI API's n")
    kwargs: dict = {**defaults, "max_tokens": DEFAULT_MAX_TOKENS}
    given: dict[str, str] = {}  # SamplingParams field -> the input that set it
    for spec in INPUTS:
        if spec.param is not None and spec.name in reader.request.inputs:
            kwargs[spec.param] = reader.scalar(spec.name, row)
            given[spec.param] = spec.name
    kwargs["stop"] = reader.values("stop_words", row)
    end_id = reader.scalar("end_id", row, None)
    if end_id is not None:
        kwargs["stop_token_ids"], kwargs["ignore_eos"] = [end_id], True
    bad = _bad_word_ids(reader.values("bad_words", row), tokenizer)
    if bad:
        kwargs["logit_bias"] = {t: -100.0 for t in bad}
    return_log_probs = reader.scalar("return_log_probs", row, False)
    if return_log_probs:
        kwargs["logprobs"] = 0
    kwargs["structured"] = _guide(reader, row)
    try:
        params = SamplingParams(**kwargs)
    except SamplingParamsError as e:
        name = given.get(e.field) or DERIVED_FROM.get(e.field, e.field)
        raise ServerError.invalid(f"input '{name}': {e}") from None
    pad_id = reader.scalar("pad_id", row, None)
    if pad_id is None:
        pad_id = end_id if end_id is not None else (tokenizer.pad_token_id or 0)
    return Job(row, prompt, params, reader.scalar("exclude_input_in_output", row, exclude_input), return_log_probs,
               pad_id)


def _guide(reader: _Reader, row: int):
    """The row's structured output, from TensorRT-LLM's guided decoding inputs (checked here), or None."""
    from kiln.runtime.structured_output import StructuredOutput

    kind = reader.scalar("guided_decoding_guide_type", row, None)
    guide = reader.scalar("guided_decoding_guide", row, None)
    if kind is None:
        if guide is not None:
            raise ServerError.invalid("input 'guided_decoding_guide' needs 'guided_decoding_guide_type'")
        return None
    if kind not in GUIDE_TYPES:
        raise ServerError.invalid(f"input 'guided_decoding_guide_type' is {kind!r}; it takes "
                                  f"{', '.join(GUIDE_TYPES)}")
    if (guide is None) != (kind == "json"):
        raise ServerError.invalid(f"input 'guided_decoding_guide' is {'needed' if guide is None else 'not taken'} "
                                  f"with guide type {kind!r}")
    try:
        constraint = StructuredOutput(GUIDE_TYPES[kind], guide or "")
        constraint.check()
    except ValueError as e:
        raise ServerError.invalid(f"input 'guided_decoding_guide': {e}") from None
    return constraint


def _bad_word_ids(words: list[str], tokenizer: EngineTokenizer) -> list[int]:
    ids = []
    for word in words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ServerError.invalid(
                f"input 'bad_words': {word!r} is {len(tokens)} tokens; kiln bans single-token words only")
        ids.append(tokens[0])
    return ids


class _Reader:
    """Reads one batch row of an input as Python values, with errors that name the input."""

    def __init__(self, request: InferenceRequest, batched: bool):
        self.request = request
        self.batched = batched

    def _row(self, name: str, row: int) -> np.ndarray | None:
        array = self.request.input(name)
        if array is None:
            return None
        spec = BY_NAME[name]
        if array.dtype.kind not in _KINDS[spec.kind]:
            raise ServerError.invalid(f"input '{name}' must hold {spec.kind} values, got {array.dtype}")
        return (array[row] if self.batched and array.ndim else array).reshape(-1)

    def scalar(self, name: str, row: int, default=None):
        values = self._row(name, row)
        if values is None:
            return default
        if values.size != 1:
            raise ServerError.invalid(f"input '{name}' must hold one value per batch row, got {values.size}")
        return self._python(name, values[0])

    def values(self, name: str, row: int) -> list:
        values = self._row(name, row)
        if values is None:
            return []
        out = [self._python(name, v) for v in values]
        return [v for v in out if v != ""] if BY_NAME[name].kind == _TEXT else out

    def _python(self, name: str, value):
        kind = BY_NAME[name].kind
        if kind == _TEXT:
            try:
                return value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                raise ServerError.invalid(f"input '{name}' is not UTF-8 text") from None
        if kind == _BOOL:
            return bool(value)
        if kind == _INT:
            return int(value)
        return float(value)
