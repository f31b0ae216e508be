"""Block tables of every KV group of a sequence, drawn from one `BlockPool` (vLLM's hybrid KV-cache manager).

A model whose layers all attend to the whole context has one group, and this is the pool itself. With
sliding-window groups (`kv_cache.KVGroups`), each group has its own table per sequence; a sliding group gives
back the blocks that left its window after each step, and a prefix-cache hit needs the full groups' leading
blocks and, for each sliding group, only the blocks of the window before the hit's end. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmkernel.memory.block_pool import NULL_BLOCK, BlockPool, PrefixCacheStats


@dataclass(frozen=True)
class CachedPrefix:
    """A prefix-cache hit: its length in tokens, and per group the blocks that hold it (`NULL_BLOCK` where a
    sliding group needs none)."""

    num_tokens: int = 0
    blocks: tuple[tuple[int, ...], ...] = ()


class KVCacheManager:
    """The scheduler's view of memory: per sequence one block table a KV group, all from one pool."""

    def __init__(self, num_blocks: int, block_size: int, windows: Sequence[int | None] = (None,),
                 enable_prefix_caching: bool = True) -> None:
        if not windows:
            raise ValueError("a KV cache needs at least one group of layers")
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.windows = tuple(windows)
        self.peak_blocks = 0  # the most blocks held at once since the start (or `reset_peak`)

    def reset_peak(self) -> None:
        self.peak_blocks = self.num_blocks - self.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds for every layer, as if no group gave a block back."""
        return self.num_blocks * self.block_size // len(self.windows)

    @property
    def enable_prefix_caching(self) -> bool:
        return self.pool.enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def stats(self) -> PrefixCacheStats:
        return self.pool.stats

    def reset_stats(self) -> None:
        self.pool.reset_stats()

    def _key(self, request_id: str, group: int) -> str:
        return request_id if group == 0 else f"{request_id}\x1fkv{group}"

    def _salt(self, salt: str, group: int) -> str:
        return salt if group == 0 else f"{salt}\x1fkv{group}"

    def block_tables(self, request_id: str) -> tuple[list[int], ...]:
        """The request's table in each group (entries `NULL_BLOCK` where a sliding group gave the block back)."""
        return tuple(self.pool.block_table(self._key(request_id, g)) for g in range(len(self.windows)))

    def block_table(self, request_id: str) -> list[int]:
        """The first group's table (the only one of a model without sliding windows)."""
        return self.pool.block_table(request_id)

    def blocks_held(self, request_id: str) -> int:
        """Blocks the request holds across its groups."""
        return sum(b != NULL_BLOCK for table in self.block_tables(request_id) for b in table)

    def find_cached_prefix(self, token_ids: Sequence[int], salt: str = "") -> CachedPrefix:
        """The longest cached prefix (in whole blocks, one token at least left to compute) every group can
        resume from: the full groups' leading blocks, and each sliding group's blocks within its window."""
        if not self.pool.enable_prefix_caching:
            return CachedPrefix()
        bs = self.block_size
        found = [self.pool.cached_blocks(token_ids, self._salt(salt, g)) for g in range(len(self.windows))]

        def needed_from(g: int, n: int) -> int:  # first block group g reads to resume after n blocks
            w = self.windows[g]
            return 0 if w is None else max(0, (n * bs - w + 1) // bs)

        n = len(found[0])
        for g in range(len(self.windows)):
            if self.windows[g] is None:
                n = min(n, found[g].index(None) if None in found[g] else len(found[g]))
        while n > 0 and not all(None not in found[g][needed_from(g, n) : n] for g in range(len(self.windows))):
            n -= 1
        self.pool.count_lookup(len(token_ids), n * bs)
        blocks = tuple(tuple([NULL_BLOCK] * needed_from(g, n) + found[g][needed_from(g, n) : n])  # type: ignore[operator]
                       for g in range(len(self.windows)))
        return CachedPrefix(n * bs, blocks if n else ())

    def can_allocate(self, request_id: str, num_tokens: int, cached: CachedPrefix | None = None) -> bool:
        """Whether every group of `request_id` can hold `num_tokens` tokens (reusing `cached` first)."""
        return self._needed(request_id, num_tokens, cached) <= self.pool.num_free_blocks

    def _needed(self, request_id: str, num_tokens: int, cached: CachedPrefix | None) -> int:
        blocks = cached.blocks if cached is not None and cached.blocks else ((),) * len(self.windows)
        return sum(self.pool.blocks_needed(self._key(request_id, g), num_tokens, blocks[g]) for g in range(len(self.windows)))

    def allocate(self, request_id: str, token_ids: Sequence[int], num_tokens: int, cached: CachedPrefix | None = None,
                 salt: str = "") -> bool:
        """Grow every group's table to hold `num_tokens` tokens; False (and no change) when blocks run out."""
        if not self.can_allocate(request_id, num_tokens, cached):
            return False
        blocks = cached.blocks if cached is not None and cached.blocks else ((),) * len(self.windows)
        for g in range(len(self.windows)):  # every group's hit first: a free cached block must not go to another group
            self.pool.adopt(self._key(request_id, g), blocks[g])
        for g in range(len(self.windows)):  # each succeeds: the groups' blocks were counted together above
            self.pool.allocate(self._key(request_id, g), token_ids, num_tokens, (), self._salt(salt, g))
        self.peak_blocks = max(self.peak_blocks, self.num_blocks - self.num_free_blocks)
        return True

    def computed(self, request_id: str, num_computed_tokens: int) -> None:
        """The request's K/V now reach `num_computed_tokens`: each sliding group gives back the blocks no later
        query reads (query p reads keys after p - window, and the next query is at `num_computed_tokens`)."""
        for g, w in enumerate(self.windows):
            if w is not None:
                self.pool.release_leading(self._key(request_id, g), max(0, (num_computed_tokens - w + 1) // self.block_size))

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Give back each group's blocks past those `num_tokens` tokens need (rejected proposals)."""
        for g in range(len(self.windows)):
            self.pool.trim(self._key(request_id, g), num_tokens)

    def free(self, request_id: str, computed_tokens: int | None = None) -> None:
        """Return every group's blocks (see `BlockPool.free`)."""
        for g in range(len(self.windows)):
            self.pool.free(self._key(request_id, g), computed_tokens)

    def blocks_for_sequence(self, num_tokens: int, chunk: int) -> int:
        """Blocks one sequence of `num_tokens` tokens holds at most, computed `chunk` tokens a step."""
        total = 0
        for w in self.windows:
            whole = self.pool.blocks_for(num_tokens)
            total += whole if w is None else min(whole, self.pool.blocks_for(w - 1 + chunk) + 1)
        return total

    def max_tokens(self, limit: int, chunk: int) -> int:
        """The longest sequence (at most `limit` tokens) the whole pool can hold, computed `chunk` tokens a step."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.blocks_for_sequence(mid, chunk) <= self.num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo
