"""The KV block manager: hands out paged-cache block ids to requests and reuses full blocks across prompts."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.runtime.request import Request

# The parent digest of a request's first block. Any fixed value works; it only has to differ from every
# real digest, which a 16-byte blake2b output of other input cannot equal in practice.
ROOT_DIGEST = b""


def root_digest(req: Request) -> bytes:
    """The parent digest of ``req``'s first block: ROOT_DIGEST, or one of its ``cache_salt``, so that only
    requests with the same salt share cached blocks."""
    salt = req.sampling_params.cache_salt
    if salt is None:
        return ROOT_DIGEST
    return hashlib.blake2b(b"cache_salt\0" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Digest of one full block given its parent's digest: it names the whole prefix up to this block.

    A cryptographic hash, so that equal digests mean equal prefixes; a hit also compares the stored token
    ids and parent digest, so a forged or corrupted entry is refused rather than served.
    """
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    # Set only while the block is registered in the prefix cache (full of computed tokens).
    digest: bytes | None = None
    parent_digest: bytes | None = None
    token_ids: tuple[int, ...] | None = None
    # Request ids that hold the block; ``ref_count`` must equal its size.
    holders: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Held:
    """What the manager remembers of a request while it holds blocks."""

    request: Request
    # Digests of the request's leading full blocks of computed tokens, in order; cache_blocks extends it.
    digests: list[bytes] = field(default_factory=list)


class BlockManager:
    """Owns the ids of ``num_blocks`` KV blocks of ``block_size`` token slots (the runner owns the tensors).

    Each block is in exactly one of three states: free (no content worth keeping), cached-unused
    (registered in the prefix cache, refcount 0, evictable in LRU order), or used (refcount > 0).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # Cached blocks with refcount 0; the first entry is the least recently released.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self._held: dict[str, _Held] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----- counters -----
    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones plus unused cached ones (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of the tokens of admitted requests that the prefix cache supplied."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def held_request_ids(self) -> frozenset[str]:
        return frozenset(self._held)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # ----- prefix cache -----
    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Cached blocks equal to the request's leading full blocks, and the tokens they cover.

        Never the whole request: a step must compute at least one token so that logits exist.
        Changes nothing; ``allocate_slots`` takes the blocks.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        tokens = req.token_ids
        parent = root_digest(req)
        hits: list[int] = []
        for i in range((req.num_tokens - 1) // bs):
            chunk = tokens[i * bs:(i + 1) * bs]
            digest = hash_block(parent, chunk)
            block_id = self._cached.get(digest)
            if block_id is None:
                break
            block = self._blocks[block_id]
            # Verify, so that a digest collision or a corrupted entry can never serve another prefix's KV.
            if block.parent_digest != parent or block.token_ids != tuple(chunk):
                break
            hits.append(block_id)
            parent = digest
        return hits, len(hits) * bs

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are now full of computed tokens, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        held = self._held.get(req.request_id)
        if held is None:
            return
        bs = self.block_size
        num_full = min(num_computed_tokens, req.num_tokens) // bs
        if num_full > len(req.block_ids):
            raise ValueError(f"request {req.request_id!r}: {num_computed_tokens} computed tokens but only "
                             f"{len(req.block_ids)} blocks")
        if num_full <= len(held.digests):  # most steps: no block filled since the last call
            return
        root = root_digest(req)
        for i in range(len(held.digests), num_full):
            parent = held.digests[i - 1] if i else root
            chunk = tuple(req.token_ids[i * bs:(i + 1) * bs])
            digest = hash_block(parent, chunk)
            held.digests.append(digest)
            # A digest already present names the same prefix (a duplicate computed concurrently, or the
            # recomputed last block of a full hit): keep the existing entry; this block is registered
            # later, at free, if that entry is gone by then.
            if digest not in self._cached:
                self._register(req.block_ids[i], digest, parent, chunk)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. after new weights) and zero the hit counters.

        Refused (False, nothing changed) while any block is in use, since those blocks' prefixes are live.
        """
        if self.num_used_blocks:
            return False
        for block_id in list(self._evictable):
            self._unregister(block_id)
            self._free.append(block_id)
        self._evictable.clear()
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        return True

    # ----- allocation -----
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make ``req.block_ids`` cover ``req.num_computed_tokens + num_new_tokens`` tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, at admission only) come first and are shared.
        Returns False, changing nothing, when the free and evictable blocks do not suffice.
        """
        if computed_blocks is None and num_new_tokens >= 0:
            # A decode step's usual case, first: the request's blocks already cover the new tokens.
            held = self._held.get(req.request_id)
            if (held is not None and held.request is req
                    and self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens) <= len(req.block_ids)):
                return True
        computed = computed_blocks or []
        if computed and req.block_ids:
            raise ValueError(f"request {req.request_id!r}: computed blocks are taken only at admission")
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        have = len(req.block_ids) + len(computed)
        need = max(0, self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens) - have)
        # Hit blocks that are unused sit in the evictable set; taking them shrinks what is left to allocate.
        revived = sum(1 for b in computed if self._blocks[b].ref_count == 0)
        if need > self.num_free_blocks - revived:
            return False
        held = self._held.get(req.request_id)
        if held is None:
            held = self._held[req.request_id] = _Held(req)
        elif held.request is not req:
            raise ValueError(f"another request with id {req.request_id!r} already holds blocks")
        for block_id in computed:
            block = self._blocks[block_id]
            if block.digest is None:
                raise ValueError(f"block {block_id} is not a cached block")
            if block.ref_count == 0:
                del self._evictable[block_id]
            self._take(block, req.request_id)
            held.digests.append(block.digest)
            req.block_ids.append(block_id)
        for _ in range(need):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._unregister(block_id)
            self._take(self._blocks[block_id], req.request_id)
            req.block_ids.append(block_id)
        if computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        return True

    def free(self, req: Request) -> None:
        """Drop the request's references; blocks that hold a cached prefix stay, evictable, until needed."""
        held = self._held.pop(req.request_id, None)
        if held is None:
            req.block_ids.clear()
            req.blocks_epoch += 1
            return
        bs = self.block_size
        # Reverse order: a request's tail is released first, so it is evicted before its head, which
        # other prompts are likelier to share.
        for i in range(len(req.block_ids) - 1, -1, -1):
            block = self._blocks[req.block_ids[i]]
            block.holders.discard(req.request_id)
            block.ref_count -= 1
            if block.ref_count:
                continue
            if block.digest is None and i < len(held.digests) and held.digests[i] not in self._cached:
                # A duplicate whose original has been evicted since: keep this copy instead.
                parent = held.digests[i - 1] if i else root_digest(req)
                self._register(block.block_id, held.digests[i], parent, tuple(req.token_ids[i * bs:(i + 1) * bs]))
            if block.digest is not None:
                self._evictable[block.block_id] = None
            else:
                self._free.append(block.block_id)
        req.block_ids.clear()
        req.blocks_epoch += 1

    # ----- internals -----
    def _take(self, block: _Block, request_id: str) -> None:
        if request_id in block.holders:
            raise ValueError(f"request {request_id!r} already holds block {block.block_id}")
        block.holders.add(request_id)
        block.ref_count += 1

    def _register(self, block_id: int, digest: bytes, parent: bytes, token_ids: tuple[int, ...]) -> None:
        block = self._blocks[block_id]
        block.digest, block.parent_digest, block.token_ids = digest, parent, token_ids
        self._cached[digest] = block_id

    def _unregister(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.digest is not None and self._cached.get(block.digest) == block_id:
            del self._cached[block.digest]
        block.digest = block.parent_digest = block.token_ids = None

    # ----- checks -----
    def check_integrity(self) -> None:
        """Raise RuntimeError naming every broken invariant of the pool; return quietly if none."""
        problems: list[str] = []
        free, evictable = set(self._free), set(self._evictable)
        used = {b.block_id for b in self._blocks if b.ref_count > 0}
        if len(free) != len(self._free):
            problems.append("a block is on the free list twice")
        for name, a, b in (("free", free, evictable), ("free", free, used), ("cached-unused", evictable, used)):
            both = a & b
            if both:
                other = "used" if b is used else "cached-unused"
                problems.append(f"blocks {sorted(both)[:8]} are both {name} and {other}")
        if len(free) + len(evictable) + len(used) != self.num_blocks or (free | evictable | used) != set(
                range(self.num_blocks)):
            problems.append(f"free {len(free)} + cached-unused {len(evictable)} + used {len(used)} "
                            f"!= total {self.num_blocks}")
        for block in self._blocks:
            bid = block.block_id
            if block.ref_count < 0:
                problems.append(f"block {bid} has refcount {block.ref_count}")
            if block.ref_count != len(block.holders):
                problems.append(f"block {bid} has refcount {block.ref_count} but holders {sorted(block.holders)}")
            for rid in block.holders:
                held = self._held.get(rid)
                if held is None or bid not in held.request.block_ids:
                    problems.append(f"block {bid} is held by {rid!r}, which does not hold it")
            if bid in free and block.digest is not None:
                problems.append(f"free block {bid} is still registered in the prefix cache")
            if bid in evictable and block.digest is None:
                problems.append(f"cached-unused block {bid} has no digest")
            if block.digest is not None:
                if self._cached.get(block.digest) != bid:
                    problems.append(f"block {bid} has a digest the cache maps to {self._cached.get(block.digest)}")
                if block.token_ids is None or len(block.token_ids) != self.block_size or block.parent_digest is None:
                    problems.append(f"cached block {bid} lacks its tokens or parent digest")
        for digest, bid in self._cached.items():
            if not 0 <= bid < self.num_blocks or self._blocks[bid].digest != digest:
                problems.append(f"the prefix cache maps a digest to block {bid}, whose metadata disagrees")
        for rid, held in self._held.items():
            req = held.request
            if rid != req.request_id:
                problems.append(f"held entry {rid!r} is request {req.request_id!r}")
            if len(set(req.block_ids)) != len(req.block_ids):
                problems.append(f"request {rid!r} lists a block twice: {req.block_ids}")
            for bid in req.block_ids:
                if not 0 <= bid < self.num_blocks or rid not in self._blocks[bid].holders:
                    problems.append(f"request {rid!r} lists block {bid} without holding it")
            if len(held.digests) > len(req.block_ids):
                problems.append(f"request {rid!r} has {len(held.digests)} block digests for "
                                f"{len(req.block_ids)} blocks")
        if problems:
            raise RuntimeError("KV block manager integrity check failed:\n  " + "\n  ".join(problems))
