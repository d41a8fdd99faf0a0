"""The KV block manager: allocation, sharing, prefix-hit verification, LRU eviction, integrity, sizing."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.runtime import kv_cache
from kiln.runtime.kv_cache import BlockManager, hash_block
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams

BS = 4


def req(rid: str, prompt: list[int]) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=8))


class Checked:
    """A BlockManager whose every public operation is followed by the integrity check."""

    def __init__(self, num_blocks: int, block_size: int = BS, **kw):
        self.bm = BlockManager(num_blocks, block_size, **kw)

    def __getattr__(self, name):
        attr = getattr(self.bm, name)
        if not callable(attr):
            return attr

        def wrapped(*args, **kwargs):
            result = attr(*args, **kwargs)
            self.bm.check_integrity()
            return result

        return wrapped


def compute(bm, r: Request, n: int | None = None, computed: list[int] | None = None) -> None:
    """Admit-or-grow ``r`` by ``n`` tokens (default: all it lacks) and mark them computed, as a step would."""
    n = r.num_tokens - r.num_computed_tokens if n is None else n
    assert bm.allocate_slots(r, n, computed)
    r.num_computed_tokens += n
    bm.cache_blocks(r, r.num_computed_tokens)


def admit(bm, r: Request) -> int:
    blocks, hit = bm.get_computed_blocks(r)
    r.num_computed_tokens = hit
    compute(bm, r, computed=blocks)
    return hit


def test_allocate_and_free():
    bm = Checked(10)
    a = req("a", range(1, 10))  # 9 tokens: 3 blocks
    assert bm.allocate_slots(a, 9)
    assert len(a.block_ids) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 7
    a.num_computed_tokens = 9
    a.append_token(42)
    assert bm.allocate_slots(a, 1)  # the 10th token still fits block 3
    assert len(a.block_ids) == 3
    a.num_computed_tokens = 10
    for t in range(3):
        a.append_token(t)
    assert bm.allocate_slots(a, 3)
    assert len(a.block_ids) == 4
    bm.free(a)
    assert a.block_ids == [] and bm.num_used_blocks == 0 and bm.num_free_blocks == 10
    assert not bm.holds("a")


def test_allocation_failure_changes_nothing():
    bm = Checked(4)
    a = req("a", range(12))
    assert bm.allocate_slots(a, 12)
    b = req("b", range(100, 108))
    before = (list(a.block_ids), bm.num_free_blocks, bm.num_used_blocks)
    assert not bm.allocate_slots(b, 8)
    assert b.block_ids == [] and not bm.holds("b")
    assert (list(a.block_ids), bm.num_free_blocks, bm.num_used_blocks) == before
    assert bm.allocate_slots(b, 4)


def test_shared_prefix_refcounts():
    bm = Checked(16)
    prefix = list(range(1, 13))  # 3 full blocks
    a = req("a", prefix + [50, 51])
    assert admit(bm, a) == 0
    b = req("b", prefix + [60])
    blocks, hit = bm.get_computed_blocks(b)
    assert hit == 12 and blocks == a.block_ids[:3]
    b.num_computed_tokens = hit
    compute(bm, b, computed=blocks)
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    assert [bm.ref_count(x) for x in a.block_ids[:3]] == [2, 2, 2]
    assert bm.num_used_blocks == 5
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_ids[:3]] == [1, 1, 1]
    assert bm.num_used_blocks == 4
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 3
    # Unused cached blocks still serve hits and count as free.
    c = req("c", prefix + [70, 71, 72])
    assert admit(bm, c) == 12
    assert bm.prefix_cache_hits == 24 and bm.prefix_cache_queries == 14 + 13 + 15


def test_hit_never_covers_the_whole_request():
    bm = Checked(8)
    a = req("a", range(8))  # exactly 2 blocks
    admit(bm, a)
    bm.free(a)
    same = req("same", range(8))
    blocks, hit = bm.get_computed_blocks(same)
    assert hit == 4 and len(blocks) == 1  # the last token must be computed for logits
    one_more = req("more", range(9))
    assert bm.get_computed_blocks(one_more)[1] == 8


def test_recomputed_duplicate_block_is_kept_when_original_evicted():
    bm = Checked(3)
    a = req("a", range(8))
    admit(bm, a)
    dup = req("dup", range(8))
    assert admit(bm, dup) == 4  # block 2 recomputed into a new block, a duplicate of a's
    assert bm.num_cached_blocks == 2
    bm.free(a)
    # a's second block is evicted for another request; dup's copy takes its place when dup is freed.
    other = req("other", [99] * 4)
    assert bm.allocate_slots(other, 4)
    assert bm.num_cached_blocks == 1
    bm.free(other)
    bm.free(dup)
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(req("again", range(9)))[1] == 8


def test_corrupted_entry_is_not_served():
    bm = Checked(16)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    b_prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    # Point b's first-block digest at a's first block: a forced collision with different tokens.
    forged = hash_block(kv_cache.ROOT_DIGEST, b_prompt[:4])
    bm.bm._cached[forged] = a.block_ids[0]
    assert bm.bm.get_computed_blocks(req("b", b_prompt)) == ([], 0)
    del bm.bm._cached[forged]
    bm.check_integrity()


def test_same_tokens_other_parent_is_not_served():
    bm = Checked(16)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    c = req("c", [9, 9, 9, 9, 5, 6, 7, 8, 9])  # same second block, other first block
    admit(bm, a)
    admit(bm, c)
    # Forge b's chain: its first block hits c's, and its second-block digest points at a's second block,
    # whose tokens match but whose parent (a's first block) does not.
    b = req("b", [9, 9, 9, 9, 5, 6, 7, 8, 1])
    d0 = hash_block(kv_cache.ROOT_DIGEST, b.token_ids[:4])
    d1 = hash_block(d0, b.token_ids[4:8])
    real = bm.bm._cached[d1]
    assert real == c.block_ids[1]
    bm.bm._cached[d1] = a.block_ids[1]
    assert bm.bm.get_computed_blocks(b) == ([c.block_ids[0]], 4)
    bm.bm._cached[d1] = real
    assert bm.get_computed_blocks(b) == (c.block_ids[:2], 8)


def test_constant_hash_never_serves_wrong_blocks(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block", lambda parent, tokens: b"same")
    bm = Checked(32)
    a = req("a", range(20))
    admit(bm, a)
    for i, prompt in enumerate([list(range(50, 70)), [0, 1, 2, 3] + [7] * 16, list(range(4, 24))]):
        r = req(f"r{i}", prompt)
        blocks, hit = bm.get_computed_blocks(r)
        # The one entry under the constant digest is a's first block; it matches only prompts starting 0..3.
        assert hit == (4 if prompt[:4] == [0, 1, 2, 3] else 0)
        assert all(bm.bm._blocks[b].token_ids == tuple(r.token_ids[j * BS:(j + 1) * BS]) for j, b in enumerate(blocks))


def test_lru_eviction_order():
    bm = Checked(6)
    a = req("a", range(0, 9))      # full blocks a0 a1, then a partial block
    b = req("b", range(100, 109))  # b0 b1, partial
    admit(bm, a)
    admit(bm, b)
    bm.free(a)  # tails first: a1 then a0 become evictable; the partial block goes to the free list
    bm.free(b)  # then b1, b0
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    # A hit refreshes recency: reuse a's head and release it again; LRU order is now a1 b1 b0 a0.
    x = req("x", [0, 1, 2, 3, 77])
    assert admit(bm, x) == 4
    bm.free(x)

    def hits() -> tuple[int, int]:
        return (bm.get_computed_blocks(req("qa", range(0, 9)))[1],
                bm.get_computed_blocks(req("qb", range(100, 109)))[1])

    assert hits() == (8, 8)
    filler = req("f", [7] * 24)
    assert bm.allocate_slots(filler, 12)  # the 2 free blocks first, then the LRU one: a's tail
    assert hits() == (4, 8)
    assert bm.allocate_slots(filler, 16)
    assert hits() == (4, 4)
    assert bm.allocate_slots(filler, 20)
    assert hits() == (4, 0)
    assert bm.allocate_slots(filler, 24)
    assert hits() == (0, 0) and bm.num_cached_blocks == 0
    assert not bm.allocate_slots(filler, 28)


def test_cache_salt_isolates_prefixes():
    """A request reuses only the cached blocks of requests with its own cache_salt (vLLM's field)."""
    bm = Checked(16)
    prefix = list(range(1, 13))
    alice = Request("alice", prefix + [50], SamplingParams(max_tokens=8, cache_salt="alice"))
    assert admit(bm, alice) == 0
    bm.free(alice)
    for name, salt, expected in (("bob", "bob", 0), ("anon", None, 0), ("alice2", "alice", 12)):
        r = Request(name, prefix + [60], SamplingParams(max_tokens=8, cache_salt=salt))
        assert bm.get_computed_blocks(r)[1] == expected, name
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_prefix_caching_off():
    bm = Checked(8, enable_prefix_caching=False)
    a = req("a", range(9))
    admit(bm, a)
    bm.free(a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(req("b", range(9))) == ([], 0)
    assert bm.prefix_cache_hit_rate == 0.0


def test_reset_prefix_cache():
    bm = Checked(8)
    a = req("a", range(9))
    admit(bm, a)
    assert not bm.reset_prefix_cache()  # refused while in use
    bm.free(a)
    assert bm.num_cached_blocks == 2
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    assert bm.get_computed_blocks(req("b", range(9))) == ([], 0)


def test_integrity_check_catches_corruption():
    bm = BlockManager(8, BS)
    a = req("a", range(9))
    admit(bm, a)
    bm._blocks[a.block_ids[0]].ref_count += 1
    with pytest.raises(RuntimeError, match="refcount"):
        bm.check_integrity()
    bm._blocks[a.block_ids[0]].ref_count -= 1
    bm.check_integrity()
    bm._free.append(a.block_ids[2])
    with pytest.raises(RuntimeError, match="both free and used"):
        bm.check_integrity()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(2, 24), caching=st.booleans())
def test_random_operations_keep_integrity(seed, num_blocks, caching):
    """Random admissions with shared prefixes, growth, and frees: the pool stays consistent throughout."""
    rng = random.Random(seed)
    bm = Checked(num_blocks, enable_prefix_caching=caching)
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    live: list[Request] = []
    for step in range(200):
        op = rng.random()
        if op < 0.35 or not live:
            prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            r = req(f"r{step}", prompt)
            blocks, hit = bm.get_computed_blocks(r)
            assert hit < r.num_tokens and hit == len(blocks) * BS
            r.num_computed_tokens = hit
            n = rng.randrange(1, r.num_tokens - hit + 1)
            if bm.allocate_slots(r, n, blocks):
                r.num_computed_tokens += n
                bm.cache_blocks(r, r.num_computed_tokens)
                live.append(r)
            else:
                assert r.block_ids == [] and not bm.holds(r.request_id)
        elif op < 0.75:
            r = rng.choice(live)
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(rng.randrange(5))
            n = rng.randrange(1, r.num_tokens - r.num_computed_tokens + 1)
            if bm.allocate_slots(r, n):
                r.num_computed_tokens += n
                bm.cache_blocks(r, r.num_computed_tokens)
        else:
            r = live.pop(rng.randrange(len(live)))
            bm.free(r)
        # Every block a live request holds lies in its table and covers its computed tokens.
        for r in live:
            assert len(r.block_ids) * BS >= r.num_computed_tokens
    for r in live:
        bm.free(r)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == num_blocks
