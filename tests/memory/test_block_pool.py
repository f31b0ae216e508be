"""BlockPool without a model: allocation, reference counts, prefix hits, LRU eviction."""

from __future__ import annotations

import pytest

from lmkernel.memory.block_pool import NULL_BLOCK, BlockPool


def test_allocate_grows_tables_and_free_returns_blocks():
    pool = BlockPool(num_blocks=8, block_size=4)
    tokens = list(range(10))
    assert pool.allocate("a", tokens, 10)
    assert len(pool.block_table("a")) == 3 and pool.num_free_blocks == 5
    assert pool.allocate("a", tokens + [10, 11], 12)  # still 3 blocks
    assert len(pool.block_table("a")) == 3
    assert pool.allocate("a", tokens + [10, 11, 12], 13)
    assert len(pool.block_table("a")) == 4 and pool.num_free_blocks == 4
    pool.free("a")
    assert pool.num_free_blocks == 8 and pool.block_table("a") == []


def test_allocation_that_does_not_fit_changes_nothing():
    pool = BlockPool(num_blocks=3, block_size=4)
    assert pool.allocate("a", list(range(8)), 8)
    before = (pool.num_free_blocks, list(pool.block_table("a")))
    assert not pool.allocate("b", list(range(100, 109)), 9)
    assert (pool.num_free_blocks, pool.block_table("a")) == before and pool.block_table("b") == []


def test_prefix_hit_shares_blocks_with_reference_counts():
    pool = BlockPool(num_blocks=10, block_size=4)
    prompt = list(range(13))  # three full blocks and one token
    assert pool.allocate("a", prompt, 13)
    cached = pool.find_cached_prefix(prompt)
    assert cached == pool.block_table("a")[:3]
    assert pool.stats.hits == 12 and pool.stats.queries == 13
    assert pool.allocate("b", prompt, 13, cached)
    assert pool.block_table("b")[:3] == cached and pool.block_table("b")[3] != pool.block_table("a")[3]
    assert [pool.ref_counts[b] for b in cached] == [2, 2, 2]
    pool.free("a")
    assert [pool.ref_counts[b] for b in cached] == [1, 1, 1]
    assert pool.num_free_blocks == 10 - 4  # a's last block back; shared ones still held by b


def test_a_hit_always_leaves_one_token_to_compute():
    pool = BlockPool(num_blocks=10, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    pool.allocate("a", prompt, 8)
    assert len(pool.find_cached_prefix(prompt)) == 1


def test_different_prefix_same_block_tokens_do_not_hit():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 9)
    assert pool.find_cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []  # block 2 equal, block 1 not


def test_freed_cached_blocks_are_reused_until_evicted_lru_first():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("old", [1, 2, 3], 3)  # blocks: [1,2] cached, [3] partial
    pool.free("old")
    pool.allocate("new", [7, 8, 9], 3)
    pool.free("new")
    # Both prefixes still findable: uncached partial blocks were reused first.
    assert len(pool.find_cached_prefix([1, 2, 3])) == 1 and len(pool.find_cached_prefix([7, 8, 9])) == 1
    # Needing three blocks evicts the least recently freed cached prefix ("old") first.
    pool.allocate("big", [20, 21, 22, 23, 24], 5)
    assert pool.find_cached_prefix([1, 2, 3]) == []
    assert len(pool.find_cached_prefix([7, 8, 9])) == 1
    pool.free("big")
    assert pool.num_free_blocks == 4


def test_reviving_a_free_cached_block_counts_against_free_space():
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.allocate("a", [1, 2, 3], 3)
    pool.free("a")
    cached = pool.find_cached_prefix([1, 2, 3])
    assert pool.can_allocate("b", 3, cached)
    assert not pool.can_allocate("b", 5, cached)


def test_prefix_caching_off():
    pool = BlockPool(num_blocks=4, block_size=2, enable_prefix_caching=False)
    pool.allocate("a", [1, 2, 3], 3)
    assert pool.find_cached_prefix([1, 2, 3]) == [] and pool.stats.queries == 0


def test_bad_sizes():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0, 16)


def test_blocks_freed_before_they_were_computed_are_not_cached():
    """A request preempted in the step that allocated its blocks never wrote them: no hit may find them."""
    pool = BlockPool(num_blocks=8, block_size=4)
    prompt = list(range(13))
    assert pool.allocate("a", prompt[:4], 4)  # first block computed in an earlier step
    assert pool.allocate("a", prompt, 13)  # this step's target: blocks 2 and 3 registered, not yet written
    pool.free("a", computed_tokens=4)
    assert len(pool.find_cached_prefix(prompt)) == 1
    assert pool.num_free_blocks == 8


def test_salted_prefixes_are_shared_only_under_the_same_salt():
    pool = BlockPool(num_blocks=10, block_size=4)
    prompt = list(range(13))
    assert pool.allocate("base", prompt, 13)
    assert pool.allocate("lora-a", prompt, 13, salt="lora:a")
    assert pool.find_cached_prefix(prompt, "lora:b") == []  # another adapter's K/V differ
    assert pool.find_cached_prefix(prompt, "lora:a") == pool.block_table("lora-a")[:3]
    assert pool.find_cached_prefix(prompt) == pool.block_table("base")[:3]
    assert set(pool.block_table("base")).isdisjoint(pool.block_table("lora-a"))


def test_blocks_past_the_known_tokens_are_not_cached_and_trim_gives_them_back():
    """Speculative proposals take blocks beyond the request's known tokens: those are never registered in the
    prefix cache (a rejected proposal's K/V must not be found), and `trim` returns them."""
    pool = BlockPool(num_blocks=8, block_size=4)
    known = list(range(6))
    assert pool.allocate("a", known, 6 + 5)  # 6 known tokens, 5 proposed: 3 blocks
    assert len(pool.block_table("a")) == 3
    assert len(pool.cached) == 1  # only the block of tokens 0-3 is full of known tokens
    pool.trim("a", 7)  # one proposal kept: 7 tokens need 2 blocks
    assert len(pool.block_table("a")) == 2 and pool.num_free_blocks == 6
    assert pool.find_cached_prefix(known + [9, 9, 9]) == pool.block_table("a")[:1]
    pool.trim("a", 1)  # never below the blocks the prefix cache holds for it
    assert len(pool.block_table("a")) == 1
    pool.free("a")
    assert pool.num_free_blocks == 8


def test_a_block_may_hold_a_single_token():
    pool = BlockPool(num_blocks=3, block_size=1)
    assert pool.allocate("a", [5, 6, 7], 3) and pool.block_table("a") == [0, 1, 2]
    with pytest.raises(ValueError, match="got 2 blocks of 0"):
        BlockPool(2, 0)


def test_lookups_add_up_until_the_stats_are_reset():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.allocate("a", list(range(9)), 9)
    pool.find_cached_prefix(list(range(9)))  # 8 of 9 tokens found
    pool.find_cached_prefix([7] * 5)  # none of 5
    assert (pool.stats.queries, pool.stats.hits, pool.stats.hit_rate) == (14, 8, 8 / 14)
    pool.reset_stats()
    assert (pool.stats.queries, pool.stats.hits, pool.stats.hit_rate) == (0, 0, 0.0)


def test_release_leading_gives_back_blocks_that_left_the_window_and_they_stay_findable():
    pool = BlockPool(num_blocks=8, block_size=4)
    prompt = list(range(13))
    pool.allocate("a", prompt, 13)
    first, second, third, fourth = pool.block_table("a")
    pool.release_leading("a", 2)
    assert pool.block_table("a") == [NULL_BLOCK, NULL_BLOCK, third, fourth] and pool.num_free_blocks == 6
    assert pool.find_cached_prefix(prompt) == [first, second, third]  # freed, still caching their tokens
    pool.release_leading("a", 3)  # the two already given back are not given back twice
    assert pool.block_table("a") == [NULL_BLOCK, NULL_BLOCK, NULL_BLOCK, fourth] and pool.num_free_blocks == 7
    pool.release_leading("a", 10)  # past the table: all of it
    pool.release_leading("unknown", 2)
    assert pool.block_table("a") == [NULL_BLOCK] * 4 and pool.num_free_blocks == 8
    pool.free("a")
    assert pool.num_free_blocks == 8 and pool.ref_counts == [0] * 8


def test_a_request_id_used_again_caches_its_new_tokens():
    pool = BlockPool(num_blocks=8, block_size=2)
    pool.allocate("a", [1, 2, 3, 4, 5], 5)
    pool.free("a")
    pool.allocate("a", [6, 7, 8, 9, 10], 5)
    assert pool.find_cached_prefix([6, 7, 8, 9, 10]) == pool.block_table("a")[:2]


def test_a_freed_block_that_caches_nothing_is_reused_before_any_cached_one():
    pool = BlockPool(num_blocks=3, block_size=2)
    pool.allocate("a", [1, 2, 3], 3)  # [1, 2] cached, [3] partial
    pool.free("a")
    pool.allocate("b", [9], 1)
    pool.free("b")  # its block caches nothing: first out, ahead of a's cached one
    pool.allocate("c", [5, 6, 7], 3)  # two blocks: both uncached ones
    assert len(pool.find_cached_prefix([1, 2, 3])) == 1


def test_blocks_forgotten_at_preemption_are_reused_before_cached_ones():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("x", [1, 2, 3], 3)
    pool.free("x")  # [1, 2] stays cached in a free block
    pool.allocate("a", [5, 6, 7, 8, 9], 5)  # [5, 6] and [7, 8] registered
    pool.free("a", computed_tokens=2)  # [7, 8] never written: forgotten, so reused first
    pool.allocate("c", [20, 21, 22], 3)
    assert len(pool.find_cached_prefix([1, 2, 3])) == 1 and len(pool.find_cached_prefix([5, 6, 7])) == 1
    assert pool.find_cached_prefix([5, 6, 7, 8, 9]) == pool.find_cached_prefix([5, 6, 7])


def test_blocks_past_the_computed_tokens_are_forgotten_even_after_released_ones():
    pool = BlockPool(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    pool.allocate("a", prompt, 6)  # three full blocks, all registered
    first = pool.block_table("a")[0]
    pool.release_leading("a", 1)
    pool.free("a", computed_tokens=0)  # the released block was written; the other two never were
    assert pool.find_cached_prefix(prompt) == [first]


def test_cached_blocks_lists_each_full_block_but_the_last_tokens_unsalted_by_default():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.allocate("a", list(range(9)), 9)
    a = pool.block_table("a")
    assert pool.cached_blocks(list(range(13))) == [a[0], a[1], None]
    assert pool.cached_blocks(list(range(13)), "lora:x") == [None, None, None]


def test_a_hit_on_blocks_another_request_holds_takes_no_free_block():
    pool = BlockPool(num_blocks=5, block_size=4)
    prompt = list(range(13))
    pool.allocate("a", prompt, 13)  # 4 blocks: 1 left free
    cached = pool.find_cached_prefix(prompt)
    assert pool.blocks_needed("b", 13, cached) == 1 and pool.can_allocate("b", 13, cached)
    assert pool.allocate("b", prompt, 13, cached) and pool.num_free_blocks == 0


def test_a_request_growing_step_by_step_caches_every_block_of_its_chain():
    pool = BlockPool(num_blocks=8, block_size=2)
    tokens = [5, 6, 7, 8, 9, 10, 11]
    for n in (2, 4, 6):
        pool.allocate("a", tokens[:n], n)
    assert pool.find_cached_prefix(tokens) == pool.block_table("a")
    assert len(pool.block_table("a")) == 3


def test_an_evicted_block_is_cached_again_under_its_new_tokens():
    pool = BlockPool(num_blocks=2, block_size=2)
    pool.allocate("a", [1, 2, 3, 4], 4)  # both blocks full and cached
    pool.free("a")
    pool.allocate("b", [5, 6, 7], 3)  # evicts both
    assert pool.find_cached_prefix([1, 2, 3]) == []
    assert pool.find_cached_prefix([5, 6, 7]) == pool.block_table("b")[:1]


def test_the_same_prompt_computed_twice_keeps_the_first_copy_cached():
    """A request that skips the cache (it wants prompt logprobs) computes its own copy of a cached prompt; losing
    that copy unwritten (preempted) must not take the first one out of the cache."""
    pool = BlockPool(num_blocks=10, block_size=4)
    prompt = list(range(13))
    pool.allocate("a", prompt, 13)
    pool.allocate("b", prompt, 13)
    pool.free("b", computed_tokens=0)
    assert pool.find_cached_prefix(prompt) == pool.block_table("a")[:3]
