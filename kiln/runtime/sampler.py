"""The sampler: one batch of last-position logits and their requests in, one next token per request out."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kiln.ops import cpu_layer_ops
from kiln.runtime import structured_output
from kiln.runtime.outputs import TokenLogprob
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.to_device import moved_to, tensor_on


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # One entry per request, None for those that did not ask; None altogether when none asked.
    logprobs: list[TokenLogprob | None] | None = None


class HostCopy:
    """Tensors on their way to the host. On a GPU the copies start at once without blocking; ``lists()``
    waits for them. So the host can prepare and launch the next step meanwhile."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            # Pinned destinations (from torch's caching host allocator), so the copies do not block.
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(tensors)

    def lists(self) -> list[list]:
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self._host]


class PendingSample:
    """A batch's chosen tokens (and requested logprobs) still on the device.

    They cross to the host through a ``HostCopy``; ``result()`` waits for it, and ``token_ids`` (on the
    device) can feed the next step's inputs meanwhile. Only these ids and logprobs ever cross to the
    host, once per step.
    """

    def __init__(self, token_ids: torch.Tensor, logprob_parts: tuple[torch.Tensor, ...] | None = None,
                 logprob_rows: list[int] | None = None, params: list[SamplingParams] | None = None):
        self.token_ids = token_ids
        self._rows = logprob_rows or []
        self._params = params or []
        self._copy = HostCopy((token_ids, *(logprob_parts or ())))
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is None:
            ids, *parts = self._copy.lists()
            logprobs = None
            if parts:
                chosen_lp, top_lp, top_ids = parts
                logprobs = [None] * len(ids)
                for j, i in enumerate(self._rows):
                    k = self._params[i].logprobs
                    logprobs[i] = TokenLogprob(ids[i], chosen_lp[j], list(zip(top_ids[j][:k], top_lp[j][:k])))
            self._result = SamplerOutput(ids, logprobs)
        return self._result


class Sampler:
    """Picks the next token of each request from its row of logits.

    Order, each step a batched tensor op over the rows that need it: logit bias (OpenAI: added to
    the named tokens' logits), repetition penalty (HF: seen
    tokens of prompt and output have positive logits divided by it, negative ones multiplied),
    frequency and presence penalties (OpenAI, over output tokens), a structured output's grammar (the
    tokens it does not allow next set to -inf: ``structured_output``), the ``min_tokens`` ban of EOS and
    stop tokens, then for non-greedy rows temperature, top-k, top-p, min-p and a draw. Greedy rows
    (``SamplingParams.greedy``) take the argmax of the penalised, banned logits; a batch of greedy rows
    with nothing else to do is one argmax.

    Logprobs are the log-softmax of the logits after the bias, penalties and grammar and before the
    ``min_tokens`` ban, temperature and the filters (vLLM reports the raw model distribution instead).

    The draw, on a GPU, is an exponential race: argmax(p / q) with q ~ Exponential(1) per token picks
    token i with probability p_i, with no sync. On a CPU, where drawing q for SmolLM2's 49,152 tokens
    took 1.4 ms a row, it is by inverse CDF: one uniform u per row, the first token whose cumulative
    probability passes u times the row's total. Either way a row's randomness comes only from that row's
    generator. A request with a ``seed`` has its own generator on the logits' device, seeded from it
    and kept across steps until ``free(request_id)``, so its tokens do not depend on which requests
    share its batch or where it sits in it. (The same seed gives other tokens on another device type:
    the generators and the draws differ.) Unseeded rows share one generator per device.
    """

    def __init__(self, seed: int | None = None):
        base = torch.Generator()
        if seed is None:
            base.seed()
        else:
            base.manual_seed(seed)
        self._base_seed = base.initial_seed()
        self._shared: dict[torch.device, torch.Generator] = {}
        self._seeded: dict[str, torch.Generator] = {}

    @property
    def num_seeded(self) -> int:
        """Requests whose generators are kept (until ``free``)."""
        return len(self._seeded)

    def free(self, request_id: str) -> None:
        """Forget a finished or aborted request's generator."""
        self._seeded.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        return self.sample(logits, requests).result()

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> PendingSample:
        """Choose each request's next token on the logits' device; nothing waits for the device here."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"expected logits of shape [{len(requests)}, vocab], got {list(logits.shape)}")
        params = [r.sampling_params for r in requests]
        want_logprobs = any(p.logprobs is not None for p in params)
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not want_logprobs and not constrained and \
                all(p.greedy and not _has_penalties(p) and not p.logit_bias for p in params) \
                and not any(_banned_now(r) for r in requests):
            return PendingSample(row_argmax(logits))

        logits = logits.to(torch.float32, copy=True)
        apply_logit_bias(logits, requests)
        apply_penalties(logits, requests)
        if constrained:
            masks = structured_output.fill_bitmasks([requests[i].grammar for i in constrained], logits.shape[1])
            structured_output.apply_bitmasks(logits, constrained, masks)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
        apply_min_tokens(logits, requests)

        chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            rows = _index(greedy, logits.device)
            chosen[rows] = row_argmax(logits[rows])
        if sampled:
            rows = _index(sampled, logits.device)
            chosen[rows] = self._sample(logits[rows], [requests[i] for i in sampled])

        if logprobs is None:
            return PendingSample(chosen)
        return PendingSample(chosen, _logprob_parts(logprobs, logprob_rows, chosen, params), logprob_rows, params)

    @staticmethod
    def needs_history(request: Request) -> bool:
        """Whether sampling this request reads the values of its earlier output tokens (penalties, or its
        grammar's state)."""
        return request.grammar is not None or _has_penalties(request.sampling_params)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        if logits.device.type == "cpu":
            return self._sample_on_cpu(logits, requests)
        probs = torch.softmax(temper_and_filter(logits, [r.sampling_params for r in requests]), dim=-1)
        device, vocab = probs.device, probs.shape[1]
        q = self._row_draws(requests, device, lambda n, gen: torch.empty(n, vocab, device=device).exponential_(
            generator=gen))
        # A zero draw would make 0/0 = nan for a masked token, which argmax would pick.
        q.clamp_(min=torch.finfo(torch.float32).tiny)
        return row_argmax(probs / q)

    def _sample_on_cpu(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Inverse-CDF draws, one uniform a row from the row's generator: in one C++ pass a row where kiln's
        extension is built (``cpu_layer_ops.sample_rows``), else (and for the rows it leaves) the filters in
        torch and the cumulative probabilities searched."""
        params = [r.sampling_params for r in requests]
        device, vocab = logits.device, logits.shape[1]
        u = self._row_draws(requests, device, lambda n, gen: torch.rand(n, dtype=torch.float64, generator=gen))
        chosen = cpu_layer_ops.sample_rows(logits, [p.temperature for p in params], [p.top_k for p in params],
                                           [p.top_p for p in params], [p.min_p for p in params], u)
        left = list(range(len(requests))) if chosen is None else (chosen < 0).nonzero().squeeze(1).tolist()
        if chosen is None:
            chosen = torch.empty(len(requests), dtype=torch.long)
        if left:
            rows = _index(left, device)
            probs = torch.softmax(temper_and_filter(logits[rows], [params[i] for i in left]), dim=-1)
            cdf = probs.cumsum(dim=-1, dtype=torch.float64)
            # The first token whose cumulative probability exceeds u * total: never one of probability 0.
            picked = torch.searchsorted(cdf, u[rows].unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
            chosen[rows] = picked.clamp_(max=vocab - 1)
        return chosen

    def _row_draws(self, requests: list[Request], device: torch.device,
                   draw: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
        """Each row's random draws (``draw(rows, generator)`` gives that many rows of them) from the row's own
        generator: the unseeded rows' from the shared one in one call, each seeded row's from its own."""
        shared = [i for i, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(shared) == len(requests):
            return draw(len(requests), self._shared_generator(device))
        seeded = [(i, draw(1, self._request_generator(r, device))) for i, r in enumerate(requests)
                  if r.sampling_params.seed is not None]
        first = seeded[0][1]
        out = torch.empty((len(requests), *first.shape[1:]), dtype=first.dtype, device=device)
        if shared:
            out[_index(shared, device)] = draw(len(shared), self._shared_generator(device))
        for i, values in seeded:
            out[i] = values[0]
        return out

    def _request_generator(self, request: Request, device: torch.device) -> torch.Generator:
        gen = self._seeded.get(request.request_id)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(request.sampling_params.seed)
            self._seeded[request.request_id] = gen
        return gen

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._base_seed + len(self._shared))
            self._shared[device] = gen
        return gen


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Add each request's ``logit_bias`` to its row, in place (ids were checked against the vocabulary)."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, r in enumerate(requests):
        for token, bias in (r.sampling_params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token)
            values.append(bias)
    if rows:
        device = logits.device
        logits.index_put_((_index(rows, device), _index(cols, device)), tensor_on(values, logits.dtype, device),
                          accumulate=True)


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Repetition (HF), frequency and presence (OpenAI) penalties, in place on float logits [B, V]."""
    rows = [i for i, r in enumerate(requests) if _has_penalties(r.sampling_params)]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    params = [requests[i].sampling_params for i in rows]
    index = _index(rows, device)
    sub = logits[index]
    rep_rows = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        # Prompt and output tokens count as seen, as in HF where both are in input_ids.
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen[_index(rep_rows, device)] = _token_counts([requests[rows[j]].token_ids for j in rep_rows],
                                                        vocab, device) > 0
        penalty = _column([p.repetition_penalty for p in params], device)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalised, sub)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = _token_counts([requests[i].output_token_ids for i in rows], vocab, device)
        frequency = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
        sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
    logits[index] = sub


def apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Ban EOS (unless ``ignore_eos``) and the stop tokens of requests with fewer than ``min_tokens`` outputs."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[1]
    for i, r in enumerate(requests):
        banned = _banned_now(r)
        for t in banned:
            if 0 <= t < vocab:
                rows.append(i)
                cols.append(t)
    if rows:
        logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                  min_p: Sequence[float]) -> torch.Tensor:
    """Top-k, then top-p, then min-p on float logits [B, V], per row; masked entries become -inf.

    top-k keeps the k largest (ties at the k-th value all stay); top-p keeps the smallest
    most-likely set whose probability, renormalised after top-k, reaches p; min-p drops tokens below
    ``min_p`` times the most likely one's probability. 0, 1 and 0 switch them off. The most likely
    token always stays. Returns a new tensor.
    """
    device, vocab = logits.device, logits.shape[1]
    logits = logits.clone()
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    # Rows with top-k alone need only the k-th largest value, not a full sort.
    k_rows = [i for i, (k, p) in enumerate(zip(ks, top_p)) if k < vocab and p >= 1.0]
    if k_rows:
        index = _index(k_rows, device)
        sub = logits[index]
        k = _index([ks[i] for i in k_rows], device).unsqueeze(1)
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, k - 1)
        logits[index] = sub.masked_fill(sub < kth, float("-inf"))
    p_rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if device.type == "cpu":  # on a GPU the sort is cheap, and the candidates' test would wait for the device
        for width in TOP_P_CANDIDATES:
            if p_rows:
                p_rows = _top_p_among_candidates(logits, p_rows, ks, top_p, width)
    if p_rows:  # rows whose nucleus may reach past the candidates: sort them
        index = _index(p_rows, device)
        sub = logits[index]
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        k = _index([ks[i] for i in p_rows], device).unsqueeze(1)
        drop = sorted_logits < sorted_logits.gather(1, k - 1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop |= mass_before >= _column([top_p[i] for i in p_rows], device)
        drop[:, 0] = False
        unsorted_drop = drop.scatter(1, order, drop)  # back from sorted to vocabulary order
        logits[index] = sub.masked_fill(unsorted_drop, float("-inf"))
    if any(p > 0.0 for p in min_p):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); min_p = 0 gives -inf: no-op.
        floor = logits.max(dim=-1, keepdim=True).values + torch.log(_column(list(min_p), device))
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


# On a CPU, top-p looks for each row's nucleus among its most likely tokens first, this many, then this many: a
# partial top-k is far cheaper there than sorting the vocabulary (SmolLM2's 49,152 logits sorted in 4.4 ms).
TOP_P_CANDIDATES = (256, 4096)


def _top_p_among_candidates(logits: torch.Tensor, rows: list[int], ks: list[int], top_p: Sequence[float],
                            width: int) -> list[int]:
    """Top-p (after top-k) in place on ``rows`` of ``logits`` whose nucleus lies within their most likely
    ``width`` tokens (or their k, if larger); returns the rows it could not settle so."""
    device, vocab = logits.device, logits.shape[1]
    width = max([width] + [ks[i] for i in rows if ks[i] < vocab])
    if width >= vocab:
        return rows
    index = _index(rows, device)
    sub = logits[index]
    values, order = sub.topk(width, dim=-1)  # sorted, most likely first
    k = _index([ks[i] for i in rows], device).unsqueeze(1)
    kth = torch.where(k <= width, values.gather(1, k.clamp(max=width) - 1), float("-inf"))
    # Probabilities after top-k, normalised over the whole row, of the candidates.
    total = torch.logsumexp(sub.masked_fill(sub < kth, float("-inf")), dim=-1, keepdim=True)
    below_k = values < kth
    probs = torch.exp(values.masked_fill(below_k, float("-inf")) - total)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    p = _column([top_p[i] for i in rows], device)
    drop = below_k | (mass_before >= p)
    drop[:, 0] = False
    # The candidates hold the nucleus when their mass reaches p: every later token then has mass before it >= p.
    settled = (mass_before[:, -1:] + probs[:, -1:] >= p).squeeze(1)
    done = settled.nonzero().squeeze(1)
    if done.numel():
        keep = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device).scatter_(1, order, ~drop)
        logits[index[done]] = sub[done].masked_fill(~keep[done], float("-inf"))
    return [i for i, ok in zip(rows, settled.tolist()) if not ok]


def temper_and_filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Float logits [B, V] of non-greedy rows divided by each row's temperature, then ``filter_logits``."""
    logits = logits / _column([p.temperature for p in params], logits.device)
    return filter_logits(logits, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params])


def _logprob_parts(logprobs: torch.Tensor, rows: list[int], chosen: torch.Tensor,
                   params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen tokens' logprobs and the top-n (values, ids) of the rows that asked, on the device."""
    chosen_rows = chosen[_index(rows, chosen.device)]
    chosen_lp = logprobs.gather(1, chosen_rows.unsqueeze(1)).squeeze(1)
    n = max(params[i].logprobs for i in rows)
    top_lp, top_ids = logprobs.topk(min(n, logprobs.shape[1]), dim=-1)
    return chosen_lp, top_lp, top_ids


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: float [len(token_lists), vocab]."""
    counts = torch.zeros(len(token_lists), vocab, device=device)
    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    if total:
        # np.fromiter is several times faster than torch.tensor on a long Python list.
        ids = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total))
        rows = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lengths))
        counts.index_put_((moved_to(rows, device), moved_to(ids, device)), torch.ones(total, device=device),
                          accumulate=True)
    return counts


def _banned_now(request: Request) -> set[int]:
    p = request.sampling_params
    if request.num_output_tokens >= p.min_tokens:
        return set()
    banned = set(p.stop_token_ids)
    if not p.ignore_eos:
        banned |= request.eos_token_ids
    return banned


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of [rows, vocab], the first index of each row's maximum (ties too).

    A large vocabulary reduces in two passes over equal chunks of each row, first each chunk's
    maximum, then the first chunk that holds the row's maximum (ties resolve as one pass does):
    - on a GPU, for few rows: torch gives each row one thread block, so one row of 128,256 logits took
      27 us of an 8B model's 4.5 ms batch-1 step on an H200 (``chunked_argmax``);
    - on a CPU, for any rows: torch's argmax there runs about 2 ns an element (88 us for SmolLM2's 49,152
      logits, 2.9 ms for 64 rows), where its amax vectorizes (``amax_argmax``: 30 us and 0.37 ms).
    """
    rows, vocab = x.shape
    chunks = math.gcd(vocab, 256)
    if vocab < 16384 or chunks < 16:
        return x.argmax(dim=-1)
    if x.device.type == "cpu":
        return amax_argmax(x, chunks)
    if x.device.type != "cuda" or rows > 16:
        return x.argmax(dim=-1)
    return chunked_argmax(x, chunks)


def chunked_argmax(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``row_argmax`` in two passes over ``chunks`` equal chunks of each row (max and argmax return
    the first index of a maximum, so ties resolve as one pass does)."""
    rows, vocab = x.shape
    values, within = x.reshape(rows, chunks, vocab // chunks).max(dim=-1)
    chunk = values.argmax(dim=-1, keepdim=True)
    return (chunk * (vocab // chunks) + within.gather(1, chunk)).squeeze(1)


def amax_argmax(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``row_argmax`` from each chunk's amax (a nan chunk's is nan, which argmax takes as the maximum, as
    it takes a nan logit), then argmax within the first chunk holding the row's maximum only."""
    rows, vocab = x.shape
    width = vocab // chunks
    split = x.reshape(rows, chunks, width)
    chunk = split.amax(dim=-1).argmax(dim=-1)
    within = split[torch.arange(rows, device=x.device), chunk].argmax(dim=-1)
    return chunk * width + within


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return tensor_on(values, torch.long, device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return tensor_on(values, torch.float32, device).unsqueeze(1)
