"""benchmarks/offload_locality.py: the LRU and forced-block bookkeeping behind its locality figures (CPU)."""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import offload_locality as loc  # noqa: E402


def test_lru_misses_counts_blocks_not_resident():
    steps = [{1, 2}, {2, 3}, {1, 3}, {4}]
    assert loc.lru_misses(steps, capacity=2) == [2, 1, 1, 1]  # {2,3} evicted 1; {1,3} misses 1 (2 was LRU)
    assert loc.lru_misses(steps, capacity=4) == [2, 1, 0, 1]


def test_unforced_drops_sink_window_open_and_padding():
    ids = torch.tensor([-1, 0, 1, 2, 3, 9])
    # blocks of 4, sink 4 tokens (block 0), window 6 of seq_len 40: blocks ending past token 34 (8, 9) are forced
    assert loc.unforced(ids, seq_len=40, block_size=4, sink=4, window=6) == {1, 2, 3}
