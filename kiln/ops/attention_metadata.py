"""What the attention ops need to know about one step's packed batch and its paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout of a packed batch (no padding) over a paged KV cache.

    Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` of the packed tokens,
    at least one; after this step its context holds ``seq_lens[i]`` tokens, the last of which are
    this step's. Token ``t`` writes its key and value to slot ``slot_mapping[t]`` (block id * block
    size + offset).

    Implementations that run inside CUDA graphs read the step only from device tensors: the
    ``triton`` attention plugin reads ``block_tables``, ``seq_lens_t`` and, for steps with more
    tokens than sequences, ``query_start_loc_t``, and decides its launch from tensor shapes alone
    (a step of as many tokens as sequences is decode-only). Where a device copy is None it builds
    one from the host list once per step (a host-to-device copy, so not inside a graph capture).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 or int64, padded with any valid block id
    query_start_loc: list[int]  # num_seqs + 1 offsets into the packed tokens
    seq_lens: list[int]  # context length of each sequence after this step
    block_size: int
    # Device copies for kernels that read them on the device (None when not needed).
    query_start_loc_t: torch.Tensor | None = None  # [num_seqs + 1] int32 or int64
    seq_lens_t: torch.Tensor | None = None  # [num_seqs] int32 or int64
    # A bound on seq_lens that fixes the shapes of a step (decode graphs); 0: max(seq_lens).
    max_seq_len: int = 0
    # What an implementation derives once per step and reuses in every layer (e.g. masks), by its own key.
    scratch: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.query_start_loc[-1] == self.num_seqs
