"""AsyncTLSConfig: the one validated configuration of the sparse decode path.

Every field maps to one `--asynctls-*` flag (see `FLAGS`). Errors name that flag and the allowed range, so a
launch with a bad value fails with one readable line instead of a traceback from a scheduler process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

LABEL_BITS = 4  # INT4 labels: two channels per byte (kernels unpack nibbles)
DEFAULT_LABEL_CHANNELS = {"gqa": 32, "mla": 128}  # d_c from the paper: 32 of 128 dims (GQA), 128 of 576 (MLA)
AUTO = "auto"  # per-layer schedules: take the model's calibrated one (channel config JSON), if it has one
GROUP_SCORES = ("sum", "max")  # how the coarse score combines a KV group's query heads (reference.block_scores)
HOST_CACHE_WAYS = 8  # lines per set of the host-row cache (offload/host_cache.py)
# the stock backend that runs prefill and short decode (dense_backend.py), as the flag offers it; the config also
# takes SGLang's CPU backend, torch_native, which the CPU tests run inside ours
DENSE_BACKEND_CHOICES = (AUTO, "fa3", "flashinfer", "triton")
DENSE_BACKENDS = DENSE_BACKEND_CHOICES + ("torch_native",)


class AsyncTLSConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


class LayerBudgetError(AsyncTLSConfigError):
    """A per-layer schedule leaves some layer budgets that cannot work (too few tokens or blocks)."""


# field name -> command-line flag; the single source for both the parser and the error messages
FLAGS = {
    "enabled": "--enable-asynctls",
    "dense_backend": "--asynctls-dense-backend",
    "block_size": "--asynctls-block-size",
    "block_budget": "--asynctls-block-budget",
    "token_budget": "--asynctls-token-budget",
    "label_channels": "--asynctls-label-channels",
    "bound_slack": "--asynctls-bound-slack",
    "group_score": "--asynctls-group-score",
    "layer_budget_scale": "--asynctls-layer-budget-scale",
    "layer_candidate_scale": "--asynctls-layer-candidate-scale",
    "channel_config": "--asynctls-channel-config",
    "sink_tokens": "--asynctls-sink-tokens",
    "local_window": "--asynctls-local-window",
    "dense_below": "--asynctls-dense-below",
    "offload": "--asynctls-offload",
    "host_kv_gib": "--asynctls-host-kv-gib",
    "host_cache_tokens": "--asynctls-host-cache-tokens",
    "host_prefetch_rows": "--asynctls-host-prefetch-rows",
    "sparse_min_kv_mib": "--asynctls-sparse-min-kv-mib",
}
MAX_PREFETCH_ROWS = 1024  # rows one host_prefetch program ranks and copies (kernels/host_prefetch.py tiles)


def layer_budgets(budget: int, num_layers: int, layer_scale: Mapping[int, float]) -> List[int]:
    """One budget (k_t or k_b) per layer under a per-layer schedule with the same average.

    A layer l in layer_scale gets floor(layer_scale[l] * budget); every other layer gets an equal share (floored)
    of what is left of num_layers * budget, so the mean over layers is at most `budget`: what some layers gain is
    taken from the others. An empty schedule is `budget` everywhere. AsyncTLS applies one schedule to both k_t and
    k_b, so each layer keeps the candidate ratio k_b * block_size / k_t.
    """
    listed = {int(layer): int(scale * budget) for layer, scale in layer_scale.items()}
    rest = num_layers - len(listed)
    other = (num_layers * budget - sum(listed.values())) // rest if rest else 0
    return [listed.get(layer, other) for layer in range(num_layers)]


def layer_candidate_budgets(block_budgets: List[int], candidate_scale: Mapping[int, float]) -> List[int]:
    """k_b per layer with extra candidates: a layer l in candidate_scale keeps floor(candidate_scale[l] * k_b_l)
    blocks, taken from no other layer. Candidates are scored with the INT4 labels but not attended, so this moves
    no attended tokens: it buys recall of the coarse stage with label-scoring work in the listed layers."""
    return [int(candidate_scale.get(layer, 1.0) * kb) for layer, kb in enumerate(block_budgets)]


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
    layer_budget_scale: per-layer budgets at the same average, "LAYER:SCALE,...": a listed layer gets SCALE x k_t
                    tokens and SCALE x k_b blocks, the other layers share what is left equally (means over layers
                    <= k_t and k_b; `layer_budgets`); "" = k_t and k_b in every layer; "auto" = the
                    model's calibrated schedule from its channel config (`with_layer_schedule`), else "".
    layer_candidate_scale: "LAYER:SCALE,...": the listed layers keep SCALE x their k_b candidate blocks, taken
                    from no other layer (label-scoring work, no attended tokens; `layer_candidate_budgets`);
                    "" = none; "auto" as above.
    channel_config: JSON from `python -m sglang_asynctls.calibrate`; None = the packaged default for the model,
                    else channels ranked by |K| at prefill
    sink_tokens:    first tokens always attended
    local_window:   last tokens always attended (the open, unindexed block is always selected as well)
    dense_below:    sequences shorter than this decode densely (bit-identical to the dense backend)
    sparse_min_kv_mib: a decode step goes sparse only when its requests of dense_below tokens or more hold at
                    least this many MiB of KV per layer; below it the whole step decodes densely (0 = every step
                    with a long request is sparse; step_choice.py)
    offload:        keep full KV in pinned host memory, a resident block set on the GPU
    host_kv_gib:    GiB of pinned host memory per rank appended to the KV pool's address range (0 = none): slots
                    past the GPU's share live in host RAM and are read over PCIe (patches/kv_host_tier.py)
    dense_backend:  the stock SGLang backend for prefill and short-sequence decode: "auto" (what stock SGLang picks
                    for the model and GPU, resolved in the launcher), "fa3", "flashinfer" or "triton"
    host_cache_tokens: with host_kv_gib, rows R of a device cache per request, layer and KV head that keeps
                    selected host-slot rows for the next steps (HOST_CACHE_WAYS-way set-associative, LRU; 0 = none;
                    offload/host_cache.py). Needs --max-running-requests: the cache is sized by request rows
    host_prefetch_rows: with host_cache_tokens, P rows per request, layer and KV head predicted for the next step
                    (the next P candidates below the k_t cut-off) and copied into the cache ahead of use on a side
                    stream (0 = off; offload/host_cache.py)
    """

    enabled: bool = False
    dense_backend: str = AUTO
    block_size: int = 64
    block_budget: int = 128
    token_budget: int = 1024
    label_channels: Optional[int] = None
    bound_slack: float = 1.0
    group_score: str = "sum"
    layer_budget_scale: str = AUTO
    layer_candidate_scale: str = AUTO
    channel_config: Optional[str] = None
    sink_tokens: int = 64
    local_window: int = 128
    dense_below: int = 8192
    sparse_min_kv_mib: float = 0.0
    offload: bool = False
    host_kv_gib: float = 0.0
    host_cache_tokens: int = 0
    host_prefetch_rows: int = 0

    def __post_init__(self):
        bs = self.block_size
        if not (isinstance(bs, int) and 16 <= bs <= 512 and bs & (bs - 1) == 0):
            _fail("block_size", "a power of two in [16, 512]", bs)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("local_window", self.local_window, 0)
        _check_int("dense_below", self.dense_below, 0)
        _check_float("sparse_min_kv_mib", self.sparse_min_kv_mib, 0.0, float(1 << 20))
        # the sink, local-window and open blocks are always kept, so the budget must hold them
        _check_int("block_budget", self.block_budget, self.forced_blocks, 1 << 16)
        cap = self.block_budget * bs
        _check_int("token_budget", self.token_budget, 1, cap)
        always = self.sink_tokens + self.local_window
        if self.token_budget <= always:
            _fail("token_budget", f"greater than --asynctls-sink-tokens + --asynctls-local-window = {always}"
                  f" and at most block budget x block size = {cap}", self.token_budget)
        _check_float("bound_slack", self.bound_slack, 0.0, 1.0)
        _check_float("host_kv_gib", self.host_kv_gib, 0.0, 4096.0)
        _check_int("host_cache_tokens", self.host_cache_tokens, 0, 1 << 20)
        if self.host_cache_tokens % HOST_CACHE_WAYS:
            _fail("host_cache_tokens", f"a multiple of {HOST_CACHE_WAYS} (the cache's ways)", self.host_cache_tokens)
        if self.host_cache_tokens and not self.host_kv_gib:
            _fail("host_cache_tokens", f"0 unless {FLAGS['host_kv_gib']} is set (it caches host-slot rows)",
                  self.host_cache_tokens)
        _check_int("host_prefetch_rows", self.host_prefetch_rows, 0, MAX_PREFETCH_ROWS)
        if self.host_prefetch_rows and not self.host_cache_tokens:
            _fail("host_prefetch_rows", f"0 unless {FLAGS['host_cache_tokens']} is set (it fills cache lines)",
                  self.host_prefetch_rows)
        if self.dense_backend not in DENSE_BACKENDS:
            _fail("dense_backend", f"one of {', '.join(DENSE_BACKEND_CHOICES)}", self.dense_backend)
        if self.group_score not in GROUP_SCORES:
            _fail("group_score", f"one of {', '.join(GROUP_SCORES)}", self.group_score)
        for layer, scale in self.layer_scale().items():  # the listed layers now; all of them in layer_budgets
            self._check_layer_budgets([(int(scale * self.token_budget), int(scale * self.block_budget))])
        for layer, scale in self.layer_scale("layer_candidate_scale").items():
            if scale < 1:
                _fail("layer_candidate_scale", "LAYER:SCALE pairs with SCALE >= 1 (more candidates, never fewer)",
                      self.layer_candidate_scale)
        if self.label_channels is not None:
            _check_int("label_channels", self.label_channels, 2, 1024)
            if self.label_channels % 2:
                _fail("label_channels", "even (INT4 labels pack two channels per byte)", self.label_channels)

    @property
    def forced_blocks(self) -> int:
        """Upper bound on blocks the coarse stage must keep regardless of score: sinks, window, open block."""
        ceil = lambda n: -(-n // self.block_size)  # noqa: E731
        return ceil(self.sink_tokens) + ceil(self.local_window) + 1

    def layer_scale(self, field: str = "layer_budget_scale") -> Dict[int, float]:
        """layer_budget_scale (or layer_candidate_scale) parsed: {layer: scale} ("auto" not resolved by
        `with_layer_schedule`: {}, every layer alike); raises naming the flag."""
        text = getattr(self, field)
        if not isinstance(text, str):
            _fail(field, "a string of LAYER:SCALE pairs", text)
        if text.strip() == AUTO:
            return {}
        out: Dict[int, float] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            try:
                layer_s, scale_s = item.split(":")
                layer, scale = int(layer_s), float(scale_s)
            except ValueError:
                _fail(field, "comma-separated LAYER:SCALE pairs, e.g. 0:4,1:2", text)
            if layer < 0 or layer in out or not 0 < scale < float("inf"):
                _fail(field, "distinct layers >= 0 with a scale > 0", text)
            out[layer] = scale
        return out

    def layer_budgets(self, num_layers: int) -> List[Tuple[int, int]]:
        """(k_t, k_b) of each of the model's layers: `layer_budgets` over k_t and k_b, then
        `layer_candidate_budgets`; checks the result (every layer, listed or not)."""
        scale, cand = self.layer_scale(), self.layer_scale("layer_candidate_scale")
        for field, pairs in (("layer_budget_scale", scale), ("layer_candidate_scale", cand)):
            if any(layer >= num_layers for layer in pairs):
                _fail(field, f"layers < {num_layers} (the model's layer count)", getattr(self, field))
        kts = layer_budgets(self.token_budget, num_layers, scale)
        kbs = layer_candidate_budgets(layer_budgets(self.block_budget, num_layers, scale), cand)
        pairs = list(zip(kts, kbs))
        self._check_layer_budgets(pairs)
        return pairs

    def _check_layer_budgets(self, pairs: List[Tuple[int, int]]) -> None:
        """Every (k_t, k_b) must attend more than sink + window, keep the forced blocks and fit its candidates."""
        always = self.sink_tokens + self.local_window
        if any(not (always < kt <= kb * self.block_size and self.forced_blocks <= kb <= 1 << 16) for kt, kb in pairs):
            raise LayerBudgetError(
                f"{FLAGS['layer_budget_scale']} must be a schedule that leaves every layer more than sink + window "
                f"= {always} tokens, {self.forced_blocks} to 65536 blocks and tokens <= blocks x block size "
                f"((k_t, k_b): {pairs}) (got {self.layer_budget_scale!r})")

    def with_layer_schedule(self, calibration: Optional[dict]) -> "AsyncTLSConfig":
        """This config with each "auto" schedule replaced by the calibration JSON's (`calibrate` / channel config:
        keys "layer_budget_scale", "layer_candidate_scale"), or by "" (every layer alike) where it has none."""
        fields = ("layer_budget_scale", "layer_candidate_scale")
        values = {f: str((calibration or {}).get(f, "")) for f in fields if getattr(self, f).strip() == AUTO}
        return dataclasses.replace(self, **values)

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

