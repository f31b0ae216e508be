"""Fixed-size KV-cache blocks: free list, reference counts, block tables, and prefix caching.

A full block is keyed by a hash of its tokens chained with the key of the block before it, so a key
names a whole prefix. The chain starts from a request's salt (its LoRA adapter, whose K/V differ
from the base model's), so only requests with the same salt share blocks. A freed block keeps its
key and stays findable until it is handed out again; free blocks are reused least recently used
first, and blocks that hold no cached prefix go first of all.
A table entry may be `NULL_BLOCK`: a sliding-window layer group gave that block back (`release_leading`),
and attention never reads it again.
No torch here: the pool only does bookkeeping, the tensors live in `kv_cache.py`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


NULL_BLOCK = -1  # a table entry whose block was given back: its tokens left every reader's window


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups counted in prompt tokens."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full block: SHA-256 over the parent block's key and this block's token ids."""
    h = hashlib.sha256(parent)
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


def chain_root(salt: str) -> bytes:
    """The parent key of a request's first block: empty, or a hash of its salt."""
    return hashlib.sha256(b"salt:" + salt.encode()).digest() if salt else b""


class BlockPool:
    """Hands out blocks to requests and takes them back; the scheduler's only view of memory."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token; got {num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out = LRU
        self.cached: dict[bytes, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.chains: dict[str, list[bytes]] = {}  # keys of each request's leading full blocks
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def find_cached_prefix(self, token_ids: Sequence[int], salt: str = "") -> list[int]:
        """Blocks already holding this prompt's leading full blocks; at least one token is left to compute."""
        if not self.enable_prefix_caching:
            return []
        found = self.cached_blocks(token_ids, salt)
        blocks = found[: found.index(None)] if None in found else found
        self.count_lookup(len(token_ids), len(blocks) * self.block_size)
        return blocks  # type: ignore[return-value]

    def cached_blocks(self, token_ids: Sequence[int], salt: str = "") -> list[int | None]:
        """For each full block of the prompt but the one holding its last token, the block caching it, or None."""
        if not self.enable_prefix_caching:
            return []
        found: list[int | None] = []
        key = chain_root(salt)
        for i in range((len(token_ids) - 1) // self.block_size):
            key = chain_hash(key, token_ids[i * self.block_size : (i + 1) * self.block_size])
            found.append(self.cached.get(key))
        return found

    def count_lookup(self, queried: int, hit: int) -> None:
        """Count a prefix-cache lookup of `queried` prompt tokens that found `hit` of them."""
        self.stats.queries += queried
        self.stats.hits += hit

    def blocks_needed(self, request_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> int:
        """Free blocks `request_id` takes to hold `num_tokens` tokens, reusing `cached_blocks` first."""
        have = len(self.tables.get(request_id, [])) + len(cached_blocks)
        revived = sum(1 for b in cached_blocks if b != NULL_BLOCK and self.ref_counts[b] == 0)
        return max(self.blocks_for(num_tokens) - have, 0) + revived

    def can_allocate(self, request_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Whether `request_id` can hold `num_tokens` tokens, reusing `cached_blocks` first."""
        return self.blocks_needed(request_id, num_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(
        self, request_id: str, token_ids: Sequence[int], num_tokens: int, cached_blocks: Sequence[int] = (),
        salt: str = "",
    ) -> bool:
        """Grow the request's table to hold `num_tokens` tokens; False (and no change) when blocks run out.

        Blocks that will be full once those tokens are computed are registered in the prefix cache now,
        so a request scheduled in the same step can share them (its attention reads after the write). Only
        blocks within `token_ids` are: tokens past them (speculative proposals) may still be rejected.
        """
        if not self.can_allocate(request_id, num_tokens, cached_blocks):
            return False
        table = self.adopt(request_id, cached_blocks)
        while len(table) < self.blocks_for(num_tokens):
            block = next(iter(self.free_blocks))
            self._take(block)
            key = self.block_keys[block]
            if key is not None:  # evict the prefix this block was caching
                if self.cached.get(key) == block:
                    del self.cached[key]
                self.block_keys[block] = None
            table.append(block)
        self._register_full_blocks(request_id, token_ids, min(num_tokens, len(token_ids)), salt)
        return True

    def adopt(self, request_id: str, cached_blocks: Sequence[int]) -> list[int]:
        """Append cached blocks (a prefix-cache hit) to the request's table, taking them off the free list before
        any block is handed out, so none of them is reused for other tokens first. Returns the table."""
        table = self.tables.setdefault(request_id, [])
        for block in cached_blocks:
            self._take(block)
            table.append(block)
        return table

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Give back the request's blocks past those `num_tokens` tokens need (the blocks of rejected proposals).
        Such blocks were never registered in the prefix cache, so they go straight back to the free list."""
        table = self.tables.get(request_id)
        if table is None:
            return
        keep = max(self.blocks_for(num_tokens), len(self.chains.get(request_id, ())))
        while len(table) > keep:
            self._give_back(table.pop())

    def release_leading(self, request_id: str, num_blocks: int) -> None:
        """Give back the request's first `num_blocks` blocks (their entries become `NULL_BLOCK`): a sliding-window
        group's blocks that left the window. Cached ones stay findable, as after `free`."""
        table = self.tables.get(request_id)
        if table is None:
            return
        for i in range(min(num_blocks, len(table))):
            if table[i] != NULL_BLOCK:
                self._give_back(table[i])
                table[i] = NULL_BLOCK

    def free(self, request_id: str, computed_tokens: int | None = None) -> None:
        """Return a request's blocks. Cached ones stay findable (tail first out); the rest are reused first.

        `computed_tokens` is given when a request leaves before the step that allocated its last blocks
        ran (preemption): blocks past it were registered but never written, so they are forgotten.
        """
        table = self.tables.pop(request_id, [])
        self.chains.pop(request_id, None)
        if computed_tokens is not None:
            for block in table[computed_tokens // self.block_size :]:
                if block == NULL_BLOCK:
                    continue
                key = self.block_keys[block]
                if key is not None and self.cached.get(key) == block:
                    del self.cached[key]
                self.block_keys[block] = None
        for block in reversed(table):
            if block != NULL_BLOCK:
                self._give_back(block)

    def reset_stats(self) -> None:
        self.stats = PrefixCacheStats()

    def _give_back(self, block: int) -> None:
        """Drop one reference; a block no one holds goes on the free list (first out if it caches nothing)."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None
            if self.block_keys[block] is None:
                self.free_blocks.move_to_end(block, last=False)

    def _take(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _register_full_blocks(self, request_id: str, token_ids: Sequence[int], num_tokens: int, salt: str) -> None:
        if not self.enable_prefix_caching:
            return
        chain = self.chains.setdefault(request_id, [])
        table = self.tables[request_id]
        for i in range(len(chain), num_tokens // self.block_size):
            key = chain_hash(chain[-1] if chain else chain_root(salt), token_ids[i * self.block_size : (i + 1) * self.block_size])
            chain.append(key)
            block = table[i]
            if block != NULL_BLOCK and key not in self.cached and self.block_keys[block] is None:
                self.cached[key] = block
                self.block_keys[block] = key
