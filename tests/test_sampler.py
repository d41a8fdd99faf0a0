"""The sampler against plain per-row references: greedy, filters, penalties, min_tokens, seeds, logprobs."""
from __future__ import annotations

import math
import random

import pytest
import torch

from kiln.runtime.request import Request
from kiln.runtime.sampler import (Sampler, amax_argmax, apply_penalties, chunked_argmax, filter_logits,
                                  temper_and_filter)
from kiln.runtime.sampling_params import SamplingParams

EOS = 2


def make_request(rid: str = "r", prompt: list[int] | None = None, output: list[int] | None = None,
                 **params) -> Request:
    prompt = prompt or [5, 6, 7]
    req = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    req.token_ids = list(prompt) + list(output or [])
    return req


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


# ----- plain-Python references -----
def ref_filter(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The token ids a row keeps after top-k, top-p and min-p, computed one token at a time."""
    keep = set(range(len(row)))
    if 0 < top_k < len(row):
        kth = sorted(row, reverse=True)[top_k - 1]
        keep = {i for i in keep if row[i] >= kth}
    if top_p < 1.0:
        total = sum(math.exp(row[i]) for i in keep)
        mass = 0.0
        kept = set()
        for i in sorted(keep, key=lambda i: -row[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += math.exp(row[i]) / total
        keep = kept
    if min_p > 0.0:
        best = max(row[i] for i in keep)
        keep = {i for i in keep if math.exp(row[i] - best) >= min_p}
    return keep


def ref_penalties(row: list[float], prompt: list[int], output: list[int], rep: float, freq: float,
                  pres: float) -> list[float]:
    out = list(row)
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if t in seen and rep != 1.0:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = output.count(t)
        out[t] -= freq * c + pres * (1.0 if c > 0 else 0.0)
    return out


# ----- greedy -----
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = random_logits(6, 50).to(dtype)
    reqs = [make_request(f"r{i}", temperature=0.0) for i in range(6)]
    assert Sampler()(logits, reqs).token_ids == logits.float().argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_is_argmax_ties_and_nan_included(dtype):
    """The two-pass argmaxes (the GPU's of few rows, the CPU's) pick what one argmax picks."""
    x = random_logits(5, 1024, seed=3).to(dtype)
    x[1, 100] = x[1, 900] = x[1].max() + 1  # a tie across chunks: the first wins
    x[2, 10] = x[2, 11] = x[2].max() + 1  # a tie within a chunk
    x[3] = 0.0  # every token ties
    x[4, 500] = float("nan")  # argmax takes nan as the maximum
    x[4, 300] = x[4].nan_to_num().max() + 1  # a larger value before it does not win
    for chunks in (16, 64, 256):
        assert chunked_argmax(x, chunks).tolist() == x.argmax(-1).tolist()
        assert amax_argmax(x, chunks).tolist() == x.argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    logits = random_logits(8, 100, seed=1)
    greedy = logits.argmax(-1).tolist()
    for seed in range(5):
        reqs = [make_request(f"r{i}", temperature=1.3, top_k=1, seed=seed if i % 2 else None) for i in range(8)]
        assert Sampler(seed=seed)(logits, reqs).token_ids == greedy


def test_empty_batch_and_shape_check():
    assert Sampler()(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [make_request()])


# ----- filters -----
def test_filter_masks_match_reference():
    rng = random.Random(0)
    vocab = 24
    for case in range(60):
        rows = 5
        logits = random_logits(rows, vocab, seed=case, scale=rng.choice([0.5, 2.0, 5.0]))
        top_k = [rng.choice([0, 1, 2, 5, 10, vocab, vocab + 3]) for _ in range(rows)]
        top_p = [rng.choice([1.0, 0.95, 0.7, 0.3, 0.05]) for _ in range(rows)]
        min_p = [rng.choice([0.0, 0.0, 0.02, 0.1, 0.5]) for _ in range(rows)]
        out = filter_logits(logits, top_k, top_p, min_p)
        for r in range(rows):
            kept = {i for i in range(vocab) if math.isfinite(out[r, i].item())}
            assert kept == ref_filter(logits[r].tolist(), top_k[r], top_p[r], min_p[r]), (case, r)
            # Kept tokens keep their logits.
            assert torch.equal(out[r, sorted(kept)], logits[r, sorted(kept)])


@pytest.mark.parametrize("scale", [4.0, 1.5, 0.05])
def test_top_p_over_a_large_vocabulary_matches_reference(scale, monkeypatch):
    """On a CPU, top-p settles a row among its 256 or 4,096 most likely tokens when its nucleus lies there, and
    sorts the row when not (a flat row's nucleus holds most of the vocabulary): the same kept sets either way,
    with and without top-k (below, within and above the candidates) and min-p."""
    import kiln.runtime.sampler as sampler

    settled = []  # (candidates, rows settled there)
    original = sampler._top_p_among_candidates

    def counted(logits, rows, ks, top_p, width):
        left = original(logits, rows, ks, top_p, width)
        settled.append((width, len(rows) - len(left)))
        return left

    monkeypatch.setattr(sampler, "_top_p_among_candidates", counted)
    vocab = 6000
    logits = random_logits(7, vocab, seed=int(scale * 10), scale=scale)
    # Top-p alone (nuclei of about 150, 900, 2,500 and 5,000 tokens at scale 1.5), then with top-k and min-p.
    groups = [([0, 0, 0, 0], [0.3, 0.7, 0.9, 0.99], [0.0, 0.0, 0.0, 0.0]),
              ([50, 300, 5000], [0.95, 0.5, 0.99], [0.0, 0.01, 0.0])]
    first = 0
    for top_k, top_p, min_p in groups:
        rows = logits[first:first + len(top_k)]
        out = filter_logits(rows, top_k, top_p, min_p)
        for r in range(len(top_k)):
            kept = {i for i in range(vocab) if math.isfinite(out[r, i].item())}
            assert kept == ref_filter(rows[r].tolist(), top_k[r], top_p[r], min_p[r]), (scale, first + r)
            assert torch.equal(out[r, sorted(kept)], rows[r, sorted(kept)])
        first += len(top_k)
    if scale == 1.5:  # each way was taken: 256 candidates, 4,096, and the sort (a row neither settled)
        assert settled[0] == (256, 1) and settled[1] == (4096, 2)


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=0.2, top_p=0.9),
                                      dict(temperature=1.3, top_k=40), dict(temperature=0.9, top_k=300, top_p=0.8),
                                      dict(temperature=0.8, min_p=0.05), dict(temperature=1.0, top_p=0.7, min_p=0.02)])
def test_cpu_kernel_draws_the_filtered_distribution(settings):
    """kiln's C++ sampling pass (cpu_layer_ops.sample_rows) over a grid of uniforms: every token it returns is one
    the filters keep, and each kept token's share of the grid is its probability (within one draw of the grid)."""
    from kiln.ops import cpu_layer_ops

    if not cpu_layer_ops.available():
        pytest.skip("kiln's CPU extension is not built here")
    vocab, draws = 3000, 4000
    row = random_logits(1, vocab, seed=11, scale=2.0)
    p = SamplingParams(**settings)
    kept = ref_filter((row[0] / p.temperature).tolist(), p.top_k, p.top_p, p.min_p)
    probs = torch.softmax(row[0, sorted(kept)].double() / p.temperature, dim=-1).tolist()
    u = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    chosen = cpu_layer_ops.sample_rows(row.expand(draws, vocab).contiguous(), [p.temperature] * draws,
                                       [p.top_k] * draws, [p.top_p] * draws, [p.min_p] * draws, u).tolist()
    assert set(chosen) <= kept
    for token, prob in zip(sorted(kept), probs):
        assert abs(chosen.count(token) - prob * draws) <= 1.5, (token, prob)


def test_cpu_kernel_top_k_past_the_candidates_and_the_torch_way_without_it(monkeypatch):
    """The kernel's top-k selects among all tokens, however far below the best (k = 10 where 3 tokens are near
    it); and where the extension is not built, the sampler draws through the torch filters, from the same
    distribution (chi-square) and inside the filtered set."""
    from kiln.ops import cpu_layer_ops

    if cpu_layer_ops.available():
        row = torch.full((1, 500), -1000.0)
        row[0, :3] = torch.tensor([5.0, 4.0, 3.0])
        u = torch.tensor([0.25, 0.9, 0.999], dtype=torch.float64)
        assert cpu_layer_ops.sample_rows(row.expand(3, 500).contiguous(), [1.0] * 3, [10] * 3, [1.0] * 3,
                                         [0.0] * 3, u).tolist() == [0, 1, 2]
    monkeypatch.setattr(cpu_layer_ops, "sample_rows", lambda *args: None)
    vocab, draws = 8, 4000
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.3, -1.0, 1.5]])
    reqs = [make_request(f"r{i}", temperature=0.8, top_k=6, seed=i if i % 2 else None) for i in range(draws)]
    tokens = Sampler(seed=5)(base.expand(draws, vocab), reqs).token_ids
    kept = sorted(ref_filter((base[0] / 0.8).tolist(), 6, 1.0, 0.0))
    assert set(tokens) <= set(kept)
    probs = torch.softmax(base[0, kept] / 0.8, -1).tolist()
    counts = [tokens.count(t) for t in kept]
    assert _chi_square(counts, probs) < 20.52, (counts, probs)  # df = 5, p = 0.001


def test_temperature_comes_before_filters():
    logits = random_logits(4, 30, seed=3)
    temps = [0.5, 1.0, 2.0, 0.7]
    reqs = [make_request(f"r{i}", temperature=t, top_p=0.8, min_p=0.05, top_k=12) for i, t in enumerate(temps)]
    out = temper_and_filter(logits, [r.sampling_params for r in reqs])
    for r, t in enumerate(temps):
        tempered = [x / t for x in logits[r].tolist()]
        kept = {i for i in range(30) if math.isfinite(out[r, i].item())}
        assert kept == ref_filter(tempered, 12, 0.8, 0.05)


def test_samples_stay_inside_the_filtered_set():
    vocab = 40
    logits = random_logits(1, vocab, seed=4, scale=1.0).expand(64, vocab)
    reqs = [make_request(f"r{i}", top_k=8, top_p=0.6, min_p=0.1, seed=i if i % 3 else None) for i in range(64)]
    allowed = ref_filter(logits[0].tolist(), 8, 0.6, 0.1)
    sampler = Sampler(seed=0)
    seen = set()
    for _ in range(20):
        seen |= set(sampler(logits, reqs).token_ids)
    assert seen <= allowed
    assert len(seen) > 1


# ----- penalties and min_tokens -----
def test_penalties_match_reference():
    vocab = 20
    logits = random_logits(5, vocab, seed=5)
    setups = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7),
        dict(frequency_penalty=0.5),
        dict(presence_penalty=-0.8, frequency_penalty=1.1, repetition_penalty=1.5),
        dict(),  # no penalties: untouched
    ]
    prompts = [[1, 3, 3, 9], [4, 4, 10], [0, 1, 2], [7, 8, 19], [1, 2]]
    outputs = [[3, 5, 5, 12], [10, 11, 11, 11], [5, 5, 6, 1, 5], [8, 8, 0], [1, 1]]
    reqs = [make_request(f"r{i}", p, o, temperature=0.0, **s)
            for i, (p, o, s) in enumerate(zip(prompts, outputs, setups))]
    out = logits.clone()
    apply_penalties(out, reqs)
    for r, (p, o, s) in enumerate(zip(prompts, outputs, setups)):
        ref = ref_penalties(logits[r].tolist(), p, o, s.get("repetition_penalty", 1.0),
                            s.get("frequency_penalty", 0.0), s.get("presence_penalty", 0.0))
        assert out[r].tolist() == pytest.approx(ref, abs=1e-5)
    # Greedy with penalties picks the argmax of the penalised logits.
    assert Sampler()(logits, reqs).token_ids == out.argmax(-1).tolist()


def test_min_tokens_blocks_eos_and_stop_tokens():
    vocab = 16
    logits = torch.zeros(1, vocab)
    logits[0, EOS] = 50.0
    logits[0, 9] = 40.0
    logits[0, 4] = 30.0
    sampler = Sampler()
    for temperature in (0.0, 1.0):
        blocked = make_request(output=[11], min_tokens=3, stop_token_ids=[9], temperature=temperature)
        assert sampler(logits, [blocked]).token_ids == [4]
        done = make_request(output=[11, 12, 13], min_tokens=3, stop_token_ids=[9], temperature=temperature)
        assert sampler(logits, [done]).token_ids == [EOS]
        # ignore_eos: EOS is no stop, so min_tokens does not hold it back; stop tokens still are.
        ignoring = make_request(output=[11], min_tokens=3, stop_token_ids=[9], ignore_eos=True,
                                temperature=temperature)
        assert sampler(logits, [ignoring]).token_ids == [EOS]


# ----- seeds -----
def _seeded_run(position: int, others: list[dict], steps: int, target: dict, logits_seed: int = 0) -> list[int]:
    """The target request's tokens over ``steps`` steps, at ``position`` among ``others``."""
    vocab = 200
    sampler = Sampler()
    target_req = make_request("target", **target)
    other_reqs = [make_request(f"o{i}", **p) for i, p in enumerate(others)]
    tokens = []
    for step in range(steps):
        reqs = other_reqs[:position] + [target_req] + other_reqs[position:]
        logits = random_logits(len(reqs), vocab, seed=1000 + step, scale=0.5)
        logits[position] = random_logits(1, vocab, seed=logits_seed + step, scale=0.5)[0]
        token = sampler(logits, reqs).token_ids[position]
        tokens.append(token)
        target_req.append_token(token)
        for r in other_reqs:
            r.append_token(0)
    return tokens


@pytest.mark.parametrize("target", [dict(seed=1234), dict(seed=7, top_p=0.9, temperature=0.8, frequency_penalty=0.3)])
def test_seeded_request_independent_of_batch(target):
    alone = _seeded_run(0, [], 6, target)
    mixes = [
        [dict(seed=s) if s % 2 else dict() for s in range(7)],
        [dict(temperature=0.0)] * 3 + [dict(seed=1234)] * 2 + [dict(top_k=5)] * 2,
        [dict(seed=99, top_p=0.5), dict(), dict(), dict(seed=3), dict(temperature=0.0, logprobs=2), dict(),
         dict(seed=1234)],
    ]
    for others in mixes:
        for position in (0, 3, 7):
            assert _seeded_run(position, others, 6, target) == alone


def test_different_seeds_differ_and_free_restarts():
    runs = {seed: _seeded_run(0, [], 8, dict(seed=seed)) for seed in range(4)}
    assert len({tuple(r) for r in runs.values()}) == 4
    sampler = Sampler()
    logits = random_logits(1, 500, scale=0.1)
    req = make_request("x", seed=11)
    first = [sampler(logits, [req]).token_ids[0] for _ in range(5)]
    assert sampler.num_seeded == 1
    sampler.free("x")
    assert sampler.num_seeded == 0
    again = [sampler(logits, [req]).token_ids[0] for _ in range(5)]
    assert first == again
    assert len(set(first)) > 1  # the generator advances across steps


# ----- distribution -----
def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


# df = 7, p = 0.001
_CHI2_CRIT = 24.32


@pytest.mark.parametrize("temperature,seeded", [(1.0, False), (1.0, True), (0.6, False)])
def test_sampling_matches_softmax(temperature, seeded):
    vocab, draws = 8, 4000
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.3, -1.0, 1.5]])
    logits = base.expand(draws, vocab)
    reqs = [make_request(f"r{i}", temperature=temperature, seed=i if seeded else None) for i in range(draws)]
    tokens = Sampler(seed=123)(logits, reqs).token_ids
    counts = [tokens.count(t) for t in range(vocab)]
    probs = torch.softmax(base[0] / temperature, -1).tolist()
    assert _chi_square(counts, probs) < _CHI2_CRIT, (counts, probs)


# ----- logprobs -----
def test_logprobs_top_n_sorted_and_correct():
    vocab = 30
    logits = random_logits(4, vocab, seed=8)
    reqs = [
        make_request("a", temperature=0.0, logprobs=5),
        make_request("b", seed=3, logprobs=0),
        make_request("c"),
        make_request("d", output=[4, 4], repetition_penalty=2.0, frequency_penalty=0.5, logprobs=3, seed=1),
    ]
    out = Sampler()(logits, reqs)
    assert out.logprobs is not None and out.logprobs[2] is None
    penalised = logits.clone()
    apply_penalties(penalised, reqs)
    for i, n in ((0, 5), (1, 0), (3, 3)):
        lp = out.logprobs[i]
        ref = torch.log_softmax(penalised[i], -1)
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        ref_top = torch.topk(ref, n)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()
        assert values == pytest.approx(ref_top.values.tolist(), abs=1e-5)
    # Greedy: the chosen token is the top one.
    assert out.logprobs[0].top[0][0] == out.token_ids[0]


def test_no_logprobs_requested_gives_none():
    out = Sampler()(random_logits(2, 10), [make_request("a"), make_request("b", temperature=0.0)])
    assert out.logprobs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_request_independent_of_batch():
    vocab = 5000
    target = make_request("target", seed=77, top_p=0.9, temperature=0.8)
    others = [make_request(f"o{i}", seed=i if i % 2 else None, top_k=[0, 20][i % 2]) for i in range(7)]
    logits = random_logits(8, vocab, seed=9, scale=0.3).cuda()
    alone_sampler = Sampler()
    alone = [alone_sampler(logits[:1], [target]).token_ids[0] for _ in range(5)]
    for position in (0, 4, 7):
        sampler = Sampler()
        reqs = others[:position] + [target] + others[position:]
        batch = logits.clone()
        batch[position] = logits[0]
        assert [sampler(batch, reqs).token_ids[position] for _ in range(5)] == alone
    greedy = [make_request(f"g{i}", temperature=0.0) for i in range(8)]
    assert Sampler()(logits.half(), greedy).token_ids == logits.half().float().argmax(-1).tolist()
