"""The hybrid KV-cache manager: a block table per KV group from one pool; sliding groups give back the blocks
that left their window, prefix-cache hits need only the window's blocks there, and every group counts."""

from __future__ import annotations

from lmkernel.memory.block_pool import NULL_BLOCK
from lmkernel.memory.kv_manager import KVCacheManager

BS = 4
TOKENS = list(range(100, 140))  # 40 tokens: 10 blocks


def hybrid(blocks: int = 100, caching: bool = True) -> KVCacheManager:
    """One full-attention group and two sliding groups of window 8 (two blocks), as Gemma 3's layers make them."""
    return KVCacheManager(blocks, BS, (None, 8, 8), caching)


def test_one_group_is_the_pool_itself() -> None:
    m = KVCacheManager(10, BS, (None,), True)
    assert m.allocate("a", TOKENS[:9], 9)
    assert m.block_tables("a") == (m.block_table("a"),) and len(m.block_table("a")) == 3
    m.computed("a", 9)  # nothing slides
    assert m.blocks_held("a") == 3 and m.num_free_blocks == 7
    assert m.max_tokens(1000, 64) == 40 and m.capacity_tokens == 40


def test_every_group_draws_its_blocks_from_the_one_pool() -> None:
    m = hybrid(30)
    assert m.allocate("a", TOKENS, 40)
    full, s1, s2 = m.block_tables("a")
    assert len(full) == len(s1) == len(s2) == 10 and len(set(full) | set(s1) | set(s2)) == 30
    assert m.num_free_blocks == 0 and not m.can_allocate("b", 1)
    m.free("a")
    assert m.num_free_blocks == 30


def test_sliding_groups_give_back_blocks_no_later_query_reads() -> None:
    m = hybrid()
    m.allocate("a", TOKENS, 40)
    m.computed("a", 40)  # the next query, at 40, reads keys 33..40: blocks 8 and 9 (tokens 32..39) stay
    full, s1, s2 = m.block_tables("a")
    assert NULL_BLOCK not in full
    assert s1[:8] == s2[:8] == [NULL_BLOCK] * 8 and NULL_BLOCK not in s1[8:] + s2[8:]
    assert m.blocks_held("a") == 10 + 2 + 2 and m.num_free_blocks == 100 - 14
    m.computed("a", 41)  # keys from 34 on: still block 8
    assert m.blocks_held("a") == 14
    m.allocate("a", TOKENS + [1, 2], 42)
    m.computed("a", 42)  # keys from 35 on
    assert m.blocks_held("a") == 11 + 2 * 3  # block 10 added in each group
    m.free("a")
    assert m.num_free_blocks == 100


def test_a_long_sequence_costs_the_full_group_and_a_window_per_sliding_group() -> None:
    m = hybrid(40)
    # 64 tokens: 16 blocks for the full group; each sliding group holds at most (8 - 1 + 4) / 4 + 1 = 4 blocks
    # when the sequence is computed 4 tokens a step.
    assert m.blocks_for_sequence(64, chunk=4) == 16 + 2 * 4
    assert m.max_tokens(10_000, chunk=4) == (40 - 8) * BS
    assert KVCacheManager(40, BS, (None, None, None), True).max_tokens(10_000, chunk=4) == 13 * BS


def test_a_prefix_hit_needs_only_the_window_of_sliding_groups() -> None:
    m = hybrid()
    m.allocate("a", TOKENS, 40)
    m.computed("a", 40)
    m.free("a")
    # A prompt of the same 40 tokens and more: the full group has blocks 0..9 cached; the sliding groups only
    # 8 and 9 (given back earlier blocks were cached too, and nothing reused them: so all are findable).
    hit = m.find_cached_prefix(TOKENS + [7, 7, 7])
    assert hit.num_tokens == 40
    assert [len(b) for b in hit.blocks] == [10, 10, 10]
    assert hit.blocks[1][:8] == (NULL_BLOCK,) * 8  # what the window does not read is not taken back
    assert m.allocate("b", TOKENS + [7, 7, 7], 43, hit)
    assert m.block_tables("b")[0][:10] == list(hit.blocks[0]) and m.blocks_held("b") == 11 + 2 * 3
    assert m.stats.hits == 40


def test_blocks_that_left_the_window_are_reused_before_those_a_hit_needs() -> None:
    m = hybrid(30)
    m.allocate("a", TOKENS, 40)
    m.computed("a", 40)
    m.free("a")
    # Another request takes 2 blocks in each group: the least recently freed, the sliding groups' blocks 0..5,
    # given back while "a" ran; what a hit on "a"'s prompt reads is still cached.
    assert m.allocate("x", list(range(500, 508)), 8)
    taken = {b for table in m.block_tables("x") for b in table}
    hit = m.find_cached_prefix(TOKENS + [7])
    assert hit.num_tokens == 40 and not taken & {b for blocks in hit.blocks for b in blocks}
    assert m.allocate("b", TOKENS + [7], 41, hit) and m.num_free_blocks == 30 - 6 - (11 + 3 + 3)


def test_a_hit_is_cut_where_a_sliding_group_lost_a_block_it_needs() -> None:
    m = hybrid()
    m.allocate("a", TOKENS, 40)
    # Forget the second sliding group's block 9 (a preemption before the step that wrote it would).
    key = m._key("a", 2)
    block = m.pool.tables[key][9]
    del m.pool.cached[m.pool.block_keys[block]]
    m.pool.block_keys[block] = None
    m.free("a")
    hit = m.find_cached_prefix(TOKENS + [7])
    # A hit of 40 needs blocks 8 and 9; of 36, blocks 7 and 8 (keys 29..35): both cached.
    assert hit.num_tokens == 36


def test_without_prefix_caching_nothing_is_found() -> None:
    m = hybrid(caching=False)
    m.allocate("a", TOKENS, 40)
    m.free("a")
    assert m.find_cached_prefix(TOKENS).num_tokens == 0 and m.stats.queries == 0


def test_trim_gives_back_each_groups_rejected_proposal_blocks() -> None:
    m = hybrid()
    m.allocate("a", TOKENS[:10], 14)  # 10 known tokens and 4 proposals: 4 blocks a group
    m.trim("a", 11)  # one proposal kept: 3 blocks
    assert [len(t) for t in m.block_tables("a")] == [3, 3, 3]
    assert m.peak_blocks == 12 and m.blocks_held("a") == 9


def test_no_group_draws_a_block_another_groups_hit_revives() -> None:
    m = KVCacheManager(8, BS, (None, 8), True)
    m.allocate("a", TOKENS[:16], 16)  # the whole pool: 4 blocks a group
    m.free("a")  # free list, least recent first: the full group's blocks, then the sliding group's
    hit = m.find_cached_prefix(TOKENS[:16] + [7])
    assert hit.num_tokens == 16
    # Every block but two is in the hit; each group needs one new block, and only the two unneeded sliding blocks
    # may be drawn (the full group drawing first must not take the sliding group's block 3).
    assert m.allocate("b", TOKENS[:16] + [7], 17, hit)
    full, sliding = m.block_tables("b")
    assert not set(full) & set(sliding) and NULL_BLOCK not in full
    assert sliding[:2] == [NULL_BLOCK, NULL_BLOCK] and m.num_free_blocks == 0
