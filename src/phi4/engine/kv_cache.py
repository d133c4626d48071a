"""Paged KV cache bookkeeping: a block allocator with automatic prefix caching.

The cache tensors live in the runner; here a block is only an id. Sequences own lists of block ids (their
block tables). A block whose tokens have all been computed gets a hash of its content chain (the previous
block's hash, its own token ids, and a salt for anything else that changes its K/V); another sequence whose
prompt starts with the same chain reuses it instead of recomputing it. Freed blocks keep their contents and
hash until the allocator needs them back (least recently freed first), so a finished prompt stays
reusable for as long as memory allows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from phi4.engine.request import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full and computed: its chain hash and the key that produced it, to rule out
    # hash collisions when another sequence looks it up.
    hash: int | None = None
    key: tuple[int | None, tuple[int, ...], object] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first; they may still hold a cached prefix.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chain hash -> block id
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence, salt: object = None) -> None:
        """Point a sequence that owns no blocks yet at the cached blocks of its longest cached prefix."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        # At least the last token must be computed, to get the logits for the next one.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        parent: int | None = None
        for index in range(max_blocks):
            key = self._key(seq, index, parent, salt)
            block_id = self._cached.get(hash(key))
            if block_id is None or self.blocks[block_id].key != key:
                break
            self._acquire(block_id)
            seq.block_table.append(block_id)
            parent = hash(key)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens

    def reserve(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the blocks to hold `num_new_tokens` more computed tokens (the caller checked room)."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self._free):
            raise RuntimeError(f"reserve() needs {needed} blocks, {len(self._free)} are free")
        for _ in range(needed):
            seq.block_table.append(self._allocate())

    def commit(self, seq: Sequence, salt: object = None) -> None:
        """Register the blocks that this step filled, so that later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        full_blocks = seq.num_computed_tokens // self.block_size
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for index in range(seq.num_hashed_blocks, full_blocks):
            block = self.blocks[seq.block_table[index]]
            key = self._key(seq, index, parent, salt)
            block.key, block.hash = key, hash(key)
            self._cached.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full_blocks)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so they should be evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _key(self, seq: Sequence, index: int, parent: int | None, salt: object) -> tuple:
        size = self.block_size
        return parent, tuple(seq.token_ids[index * size : (index + 1) * size]), salt

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _allocate(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = block.key = None
        block.ref_count = 1
        return block_id
