"""benchmarks/offload_token_locality.py: the token cache simulator on toy steps with hand-checked hits (CPU)."""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import offload_locality as loc  # noqa: E402
import offload_token_locality as tok  # noqa: E402


def run(steps, lines, ways, index="mod"):
    cache = tok.SetAssocLRU(lines, ways, index)
    return [cache.step(np.array(s)) for s in steps]


def test_fully_associative_matches_block_lru():
    steps = [[1, 2], [2, 3], [1, 3], [4], [3, 4, 5, 6]]
    hits = run(steps, lines=4, ways=4)
    # step 2: {1,2,3} resident -> 1, 3 hit; step 3: 4 fills the empty line; step 4: 3, 4 hit, 5 and 6 evict 2, 1
    assert hits == [0, 1, 2, 0, 2]
    assert hits == [len(s) - m for s, m in zip(steps, loc.lru_misses([set(s) for s in steps], 4))]


def test_direct_mapped_conflicts():
    # 4 lines, set = pos mod 4: 0 and 4 share set 0; in one step only the first is cached, the other bypasses
    # (step 1: 0's line was hit, so 4 bypasses again); step 2: 4 alone evicts 0; step 3: 4 hits
    assert run([[0, 4, 1], [0, 4, 1], [4], [4]], lines=4, ways=1) == [0, 2, 0, 1]


def test_lines_touched_this_step_are_not_evicted():
    # 2 sets x 2 ways; set 0 holds {0, 2}. Step 2 hits 0 and misses 4, 6: only line of 2 may go (0 was hit),
    # so 4 takes it and 6 bypasses. Step 3: 0 and 4 resident, 6 and 2 are not.
    assert run([[0, 2], [0, 4, 6], [0, 2, 4, 6]], lines=4, ways=2) == [0, 1, 2]


def test_lru_within_a_set():
    # 1 set x 2 ways (fully associative): 1 is refreshed in step 2, so step 3's miss evicts 2
    assert run([[1], [2], [1], [3], [1, 2]], lines=2, ways=2) == [0, 0, 1, 0, 1]


def test_hash_index_is_a_valid_set():
    cache = tok.SetAssocLRU(lines=96, ways=4, index="hash")
    s = cache.set_of(np.arange(10_000))
    assert s.min() >= 0 and s.max() < 24 and len(np.unique(s)) == 24
    assert cache.step(np.arange(64)) == 0 and cache.step(np.arange(64)) > 0
