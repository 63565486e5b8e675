"""benchmarks/prefetch_coverage.py's counting: predictor coverage of the next step's newcomers and the cache
simulation of the lookup + prefetch policies, on hand-made selections."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import prefetch_coverage as pc  # noqa: E402


def _a(*x):
    return np.array(x, np.int64)


def test_coverage_counts_newcomers_and_what_each_predictor_held():
    # block size 4; (S_t, near-misses in rank order, M_t)
    steps = [(_a(0, 1, 2, 8), _a(9, 10, 3), {0, 2}),
             (_a(0, 1, 9, 10), _a(12, 5), {0, 2, 3}),  # block 3 enters M_1: rows 12..15 predicted for step 2
             (_a(0, 9, 12, 13), _a(), {0, 2, 3})]
    c = pc.coverage(steps, [1, 2], 4)
    # newcomers: {9, 10} at step 1, {12, 13} at step 2
    assert (c["newcomers"], c["selected"]) == (4, 8)
    assert (c["near_1_hit"], c["near_2_hit"], c["near_1_rows"], c["near_2_rows"]) == (2, 3, 2, 4)
    assert (c["new_blocks_hit"], c["new_blocks_rows"], c["candidates_hit"]) == (2, 4, 4)
    assert (c["near_1_or_blocks_hit"], c["near_2_or_blocks_hit"]) == (3, 4)


def test_cache_lookup_fills_one_line_a_set_and_the_prefetch_takes_the_rest():
    cache = pc.Cache(8)  # one set of 8 ways
    hits, ahead, uncached = cache.lookup(_a(1, 2, 3), 10)
    assert (hits, ahead, uncached.tolist()) == (0, 0, [1, 2])  # the highest-index miss (3) fills
    # entries: a near-miss, then the lag rows; by descending entry 2, 1, 5 take the set's empty lines
    assert cache.prefetch(np.concatenate([_a(5), uncached]), 10) == 3
    assert cache.tag[0].tolist()[:4] == [3, 2, 1, 5] and cache.fetched[0].tolist()[:4] == [False, True, True, True]
    assert cache.prefetch(_a(5, 3), 10) == 0  # held already
    hits, ahead, uncached = cache.lookup(_a(1, 2, 5, 3, 7), 11)
    assert (hits, ahead, uncached.tolist()) == (4, 3, [])  # 7 fills way 4


def test_simulate_counts_from_the_second_step():
    steps = [(_a(1, 2), _a(3), set()), (_a(1, 3), _a(), set()), (_a(3, 4), _a(), set())]
    off = pc.simulate(steps, 8, 0, 100)
    on = pc.simulate(steps, 8, 1, 100)
    # step 0 fills 2 (one fill a set); step 1 misses 1 and 3 (3 fills); step 2 hits 3
    assert off == {"lookups": 4, "hits": 1, "fetched": 0, "ahead_hits": 0}
    assert on == {"lookups": 4, "hits": 2, "fetched": 1, "ahead_hits": 1}  # 3 fetched at step 0, hit at step 1
