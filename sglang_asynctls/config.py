"""AsyncTLSConfig: the one validated configuration of the sparse decode path.

Every field maps to one `--asynctls-*` flag (see `FLAGS`). Errors name that flag and the allowed range, so a
launch with a bad value fails with one readable line instead of a traceback from a scheduler process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

LABEL_BITS = 4  # INT4 labels: two channels per byte (kernels unpack nibbles)
DEFAULT_LABEL_CHANNELS = {"gqa": 32, "mla": 128}  # d_c from the paper: 32 of 128 dims (GQA), 128 of 576 (MLA)
GROUP_SCORES = ("sum", "max")  # how the coarse score combines a KV group's query heads (reference.block_scores)


class AsyncTLSConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


# field name -> command-line flag; the single source for both the parser and the error messages
FLAGS = {
    "enabled": "--enable-asynctls",
    "block_size": "--asynctls-block-size",
    "block_budget": "--asynctls-block-budget",
    "token_budget": "--asynctls-token-budget",
    "label_channels": "--asynctls-label-channels",
    "bound_slack": "--asynctls-bound-slack",
    "group_score": "--asynctls-group-score",
    "channel_config": "--asynctls-channel-config",
    "sink_tokens": "--asynctls-sink-tokens",
    "local_window": "--asynctls-local-window",
    "dense_below": "--asynctls-dense-below",
    "offload": "--asynctls-offload",
}


def _fail(field: str, allowed: str, got) -> None:
    raise AsyncTLSConfigError(f"{FLAGS[field]} must be {allowed} (got {got!r})")


def _check_int(field: str, value, lo: int, hi: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        _fail(field, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", value)


def _check_float(field: str, value, lo: float, hi: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        _fail(field, f"a number in [{lo:g}, {hi:g}]", value)


@dataclass(frozen=True)
class AsyncTLSConfig:
    """Sparse-decode settings, validated on construction.

    block_size:     tokens per coarse block B (Kmin/Kmax are kept per block and KV head)
    block_budget:   k_b, blocks kept per KV group by the coarse stage (forced sink/window blocks included)
    token_budget:   k_t, tokens attended per KV group (sink and window tokens included)
    label_channels: d_c, heavy channels kept as INT4 labels; None = 32 for GQA, 128 for MLA
    bound_slack:    weight s of each block's Kmin/Kmax half-range in the coarse score
                    sum_h (q_h . centre + s |q_h| . half-range); 1 = the exact min/max upper bound (Quest's),
                    0 = the block centre (docs/tuning.md "Coarse score")
    group_score:    "sum" or "max": how the coarse score combines the query heads of a KV group
    channel_config: JSON from `python -m sglang_asynctls.calibrate`; None = the packaged default for the model,
                    else channels ranked by |K| at prefill
    sink_tokens:    first tokens always attended
    local_window:   last tokens always attended (the open, unindexed block is always selected as well)
    dense_below:    sequences shorter than this decode densely (bit-identical to the dense backend)
    offload:        keep full KV in pinned host memory, a resident block set on the GPU
    """

    enabled: bool = False
    block_size: int = 64
    block_budget: int = 128
    token_budget: int = 1024
    label_channels: Optional[int] = None
    bound_slack: float = 1.0
    group_score: str = "sum"
    channel_config: Optional[str] = None
    sink_tokens: int = 64
    local_window: int = 128
    dense_below: int = 8192
    offload: bool = False

    def __post_init__(self):
        bs = self.block_size
        if not (isinstance(bs, int) and 16 <= bs <= 512 and bs & (bs - 1) == 0):
            _fail("block_size", "a power of two in [16, 512]", bs)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("local_window", self.local_window, 0)
        _check_int("dense_below", self.dense_below, 0)
        # the sink, local-window and open blocks are always kept, so the budget must hold them
        _check_int("block_budget", self.block_budget, self.forced_blocks, 1 << 16)
        cap = self.block_budget * bs
        _check_int("token_budget", self.token_budget, 1, cap)
        always = self.sink_tokens + self.local_window
        if self.token_budget <= always:
            _fail("token_budget", f"greater than --asynctls-sink-tokens + --asynctls-local-window = {always}"
                  f" and at most block budget x block size = {cap}", self.token_budget)
        _check_float("bound_slack", self.bound_slack, 0.0, 1.0)
        if self.group_score not in GROUP_SCORES:
            _fail("group_score", f"one of {', '.join(GROUP_SCORES)}", self.group_score)
        if self.label_channels is not None:
            _check_int("label_channels", self.label_channels, 2, 1024)
            if self.label_channels % 2:
                _fail("label_channels", "even (INT4 labels pack two channels per byte)", self.label_channels)

    @property
    def forced_blocks(self) -> int:
        """Upper bound on blocks the coarse stage must keep regardless of score: sinks, window, open block."""
        ceil = lambda n: -(-n // self.block_size)  # noqa: E731
        return ceil(self.sink_tokens) + ceil(self.local_window) + 1

    def resolved_label_channels(self, kind: str) -> int:
        return self.label_channels if self.label_channels is not None else DEFAULT_LABEL_CHANNELS[kind]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AsyncTLSConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AsyncTLSConfigError(f"unknown AsyncTLS config keys: {sorted(unknown)}")
        return cls(**data)


PRESETS = {
    # the paper's operating points (Qwen3-8B): k_b = 128 blocks of 64, k_t from 512 to 2048
    "paper-512": AsyncTLSConfig(enabled=True, token_budget=512),
    "paper-1024": AsyncTLSConfig(enabled=True, token_budget=1024),
    "paper-2048": AsyncTLSConfig(enabled=True, token_budget=2048),
}
