"""Run reference.METHODS as the decode attention of a real model (SmolLM2), over an SGLang-layout KV cache.

Prefill is dense (`SmolLlama.prefill`) and writes every layer's post-RoPE K/V into `DocumentKV`, one request's
pool: k [layers, S, Hkv, D], req_to_token rows -> slots, and per layer the AsyncTLS index (block Kmin/Kmax + INT4
labels, `reference.build_index`). Decode steps then go through `MethodAttention`, which calls one of
`reference.METHODS` per layer with that layer's index and channels.

Two ways to decode (both give each query exactly the dense-prefilled cache of the tokens before it):
    generate      greedy, one request, each new token's K/V appended at its own slot (real decode);
    window rows   teacher forcing: positions p_0..p_{W-1} of a prefilled text decoded at once as W requests
                  sharing the prefix; row i maps position p_i to an extra slot that holds the K/V computed in
                  this pass, seq_len_i = p_i + 1. The block index is the prefill's: a row only sees blocks that
                  are complete at its seq_len (`block_scores` masks the rest).

Notations for shapes: as in reference.py; W window rows, C slot capacity.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, FrozenSet, List, Mapping, Optional, Tuple

import torch

from sglang_asynctls import reference as ref
from sglang_asynctls.config import layer_budgets, layer_candidate_budgets
from sglang_asynctls.smollm2 import SmolLlama

DEFAULT_SINK, DEFAULT_WINDOW = 64, 128  # AsyncTLSConfig defaults, sized for a 1,024-token budget


@dataclass(frozen=True)
class Budget:
    """Equal-token-budget settings shared by every method.

    token_budget: tokens attended per KV group (k_t), sink and window included. Quest gets the same number of
        tokens as whole blocks (token_budget // block_size blocks); token-only picks them from all tokens;
        AsyncTLS picks them from `block_budget` candidate blocks.
    bound_slack, group_score: AsyncTLS's coarse score (`reference.block_scores`); Quest keeps its own (1, sum).
    layer_budgets: AsyncTLS's (k_t, k_b) per layer (`config.layer_budgets`: means <= token_budget and
        block_budget, then `config.layer_candidate_budgets`); empty = the same in every layer. Other methods
        ignore it.
    """

    token_budget: int
    block_budget: int
    sink_tokens: int
    local_window: int
    block_size: int = 64
    bound_slack: float = 1.0
    group_score: str = "sum"
    layer_budgets: Tuple[Tuple[int, int], ...] = ()

    @classmethod
    def fraction_of(cls, context: int, fraction: int, candidate_ratio: int = 4, block_size: int = 64,
                    sink_tokens: int = DEFAULT_SINK, local_window: int = DEFAULT_WINDOW,
                    bound_slack: float = 1.0, group_score: str = "sum", layer_scale: Mapping[int, float] = {},
                    candidate_scale: Mapping[int, float] = {}, num_layers: int = 0) -> "Budget":
        """k_t = context / fraction; k_b * block_size = candidate_ratio * k_t (the paper's 8,192 candidates for
        k_t = 2,048); sink and window shrink with k_t below 1,024 so forced tokens stay <= 3/16 of the budget.
        layer_scale (layer -> multiple) over num_layers layers: AsyncTLS's per-layer k_t and k_b, same means;
        candidate_scale (layer -> multiple): extra candidate blocks on top (`config.layer_candidate_budgets`)."""
        kt = context // fraction
        shrink = min(1.0, kt / 1024)
        kb = max(1, -(-candidate_ratio * kt // block_size))
        per_layer = ()
        if layer_scale or candidate_scale:
            kbs = layer_candidate_budgets(layer_budgets(kb, num_layers, layer_scale), candidate_scale)
            per_layer = tuple(zip(layer_budgets(kt, num_layers, layer_scale), kbs))
        return cls(kt, kb, int(sink_tokens * shrink), int(local_window * shrink), block_size, bound_slack,
                   group_score, per_layer)

    def kwargs(self, method: str, layer: Optional[int] = None) -> dict:
        kb = max(1, self.token_budget // self.block_size) if method == "quest" else self.block_budget
        kt = self.token_budget
        extra = {}
        if method == "asynctls":
            extra = dict(bound_slack=self.bound_slack, group_score=self.group_score)
            if self.layer_budgets and layer is not None:
                kt, kb = self.layer_budgets[layer]
        return dict(block_size=self.block_size, block_budget=kb, token_budget=kt,
                    sink_tokens=self.sink_tokens, local_window=self.local_window, **extra)


# observe(layer, q [B, Hq, D], token_slots [B, Hkv, K], seq_lens [B]): what a method attended (for recall)
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
DENSE_BUDGET = Budget(1, 1, 0, 0)  # what dense decode is handed (it reads no budget)


@dataclass
class LayerIndex:
    kmin: torch.Tensor  # [E, Hkv, D]
    kmax: torch.Tensor
    table: torch.Tensor  # [1, ceil(C / BS)] int32 entries of the indexed prefix's complete blocks, else -1
    labels: torch.Tensor  # [C, Hkv, Dc // 2] uint8
    scale: torch.Tensor  # [C, Hkv] float32
    indexed_len: int


class DocumentKV:
    """One prompt's KV cache in SGLang layout plus `extra` free slots, and its per-layer AsyncTLS index.

    k, v: [layers, C, Hkv, D] float32 with C = capacity; req_to_token: [rows, C] int32; channels [layers, Hkv, Dc].
    """

    def __init__(self, model: SmolLlama, ids: torch.Tensor, channels: torch.Tensor, extra: int,
                 block_size: int = 64, probe: Optional[Callable[[int, torch.Tensor, "DocumentKV"], None]] = None,
                 logit_positions: Optional[torch.Tensor] = None):
        """Dense prefill of ids [L]; probe(layer, q [L, Hq, D], self) runs once the layer's K/V and index exist;
        the prefill's logits at logit_positions (default: the last) are kept as `prefill_logits` [P, V]."""
        s = model.shape
        self.length = len(ids)
        self.capacity = self.length + extra
        self.k = torch.zeros(s.num_layers, self.capacity, s.num_kv_heads, s.head_dim)
        self.v = torch.zeros_like(self.k)
        self.channels = channels
        self.block_size = block_size
        self.req_to_token = torch.arange(self.capacity, dtype=torch.int32)[None]
        self.index: List[LayerIndex] = []

        def store(layer, q, k, v):
            self.k[layer, : len(k)] = k
            self.v[layer, : len(v)] = v
            self.index.append(self._build(layer, self.length))
            if probe is not None:
                probe(layer, q, self)

        self.prefill_logits = model.prefill(ids, store, logit_positions)

    def _build(self, layer: int, seq_len: int) -> LayerIndex:
        kmin, kmax, table, labels, scale = ref.build_index(
            self.k[layer], self.req_to_token[:1], torch.zeros(1, dtype=torch.long), torch.tensor([seq_len]),
            self.channels[layer], self.block_size)
        nb = -(-self.capacity // self.block_size)  # NB covers every block decode may open, not just the prefix
        table = torch.cat([table, table.new_full((1, nb - table.shape[1]), -1)], dim=1)
        return LayerIndex(kmin, kmax, table, labels, scale, seq_len)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store decode K/V at slots [B] and label them (as the backend does when a token is appended)."""
        self.k[layer, slots.long()] = k
        self.v[layer, slots.long()] = v
        idx = self.index[layer]
        idx.labels[slots.long()], idx.scale[slots.long()] = ref.quantize_labels(k, self.channels[layer])

    def refresh_blocks(self, layer: int, seq_len: int) -> None:
        """Re-index row 0 when decode has completed a block since the last build."""
        idx = self.index[layer]
        if seq_len // self.block_size > idx.indexed_len // self.block_size:
            labels, scale = idx.labels, idx.scale
            self.index[layer] = replace(self._build(layer, seq_len), labels=labels, scale=scale)

    def extend(self, model: SmolLlama, ids: torch.Tensor) -> None:
        """Append ids [T] with dense attention, as SGLang's extend (a follow-up prompt) does: one batched decode
        step whose row i writes slot length + i and sees positions < length + i + 1, i.e. causal attention."""
        n, start = len(ids), self.length
        batch = Batch(torch.zeros(n, dtype=torch.long), torch.arange(start + 1, start + n + 1),
                      torch.arange(start, start + n))
        model.decode(ids, batch.out_slots, MethodAttention(self, batch, "dense", DENSE_BUDGET))
        self.truncate(start + n)

    def truncate(self, length: int) -> None:
        """Make positions < length the request (and the indexed prefix); later slots are free again."""
        self.length = length
        for i, idx in enumerate(self.index):
            if idx.indexed_len != length:
                self.index[i] = replace(self._build(i, length), labels=idx.labels, scale=idx.scale)

    def window_rows(self, positions: torch.Tensor) -> "Batch":
        """Teacher-forcing batch: row i sees positions < p_i from the prefill and p_i at extra slot length+i."""
        w = len(positions)
        assert self.length + w <= self.capacity and int(positions.max()) < self.length
        rows = self.req_to_token[:1].repeat(w + 1, 1)
        out = torch.arange(self.length, self.length + w, dtype=torch.int32)
        rows[1 + torch.arange(w), positions.long()] = out
        self.req_to_token = rows
        return Batch(torch.arange(1, w + 1), positions.long() + 1, out)


@dataclass
class Batch:
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] int64, the query's own token included
    out_slots: torch.Tensor  # [B] where the step's K/V go


class MethodAttention:
    """attention(layer, q, k, v) for `SmolLlama.decode`: store K/V, then one reference method over the cache.

    dense_layers: layers that decode densely whatever the method (a per-layer tuning knob).
    """

    def __init__(self, kv: DocumentKV, batch: Batch, method: str, budget: Budget,
                 dense_layers: FrozenSet[int] = frozenset(), observe: Optional[Observer] = None):
        self.kv, self.batch, self.method, self.budget = kv, batch, method, budget
        self.dense_layers = dense_layers
        self.observe = observe
        self.sm_scale = ref.default_sm_scale(kv.k.shape[-1])

    def run(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The method over the cache as it stands (no write): o [B, Hq, D]."""
        kv, b = self.kv, self.batch
        name = "dense" if layer in self.dense_layers else self.method
        idx = kv.index[layer]
        table = idx.table.expand(len(b.seq_lens), -1)
        with capture_slots() as seen:
            o = ref.METHODS[name](q, kv.k[layer], kv.v[layer], kv.req_to_token, b.req_pool_indices, b.seq_lens,
                                  idx.kmin, idx.kmax, table, idx.labels, idx.scale, kv.channels[layer],
                                  sm_scale=self.sm_scale, **self.budget.kwargs(name, layer))
        if self.observe is not None:
            self.observe(layer, q, seen[-1], b.seq_lens)
        return o

    def __call__(self, layer, q, k, v):
        self.kv.write(layer, self.batch.out_slots, k, v)
        self.kv.refresh_blocks(layer, int(self.batch.seq_lens.max()))  # no-op for window rows
        return self.run(layer, q)


@contextlib.contextmanager
def capture_slots():
    """Record the token_slots [B, Hkv, K] every reference method hands to `sparse_decode` (its selection)."""
    seen: List[torch.Tensor] = []
    inner = ref.sparse_decode

    def spy(q, k_buffer, v_buffer, token_slots, sm_scale, **kwargs):
        seen.append(token_slots)
        return inner(q, k_buffer, v_buffer, token_slots, sm_scale, **kwargs)

    ref.sparse_decode = spy
    try:
        yield seen
    finally:
        ref.sparse_decode = inner


def attention_mass(q: torch.Tensor, keys: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor,
                   sm_scale: float) -> torch.Tensor:
    """Share of each query head's dense attention probability held by its group's selected tokens.

    For rows of one request whose slot of position t is t (the prefill's identity mapping): q [B, Hq, D],
    keys [L, Hkv, D] of positions 0..L-1, seq_lens [B] (row b sees positions < seq_lens[b]), slots [B, Hkv, K]
    selected positions, distinct, -1 padded. Returns [B, Hq] float32 in [0, 1].
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    n = int(seq_lens.max())
    logits = torch.einsum("bhgd,lhd->bhgl", q.float().view(b, hkv, hq // hkv, d), keys[:n].float()) * sm_scale
    hidden = torch.arange(n)[None] >= seq_lens[:, None]  # [B, n]
    probs = torch.softmax(logits.masked_fill(hidden[:, None, None], ref.NEG_INF), dim=-1)
    picked = torch.gather(probs, 3, slots.long().clamp(min=0)[:, :, None].expand(-1, -1, hq // hkv, -1))
    return (picked * (slots >= 0)[:, :, None]).sum(-1).reshape(b, hq)


def generate(model: SmolLlama, kv: DocumentKV, last_prompt_token: int, budget: Budget, method: str,
             max_new: int, stop_ids: FrozenSet[int] = frozenset(), dense_layers: FrozenSet[int] = frozenset(),
             observe: Optional[Observer] = None) -> List[int]:
    """Greedy decode of one request whose prompt minus its last token was prefilled into `kv`.

    The last prompt token is decoded through `method` too, so every answer token (the first included) comes
    from sparse attention; the K/V of position t lands at slot t. Decoding past the prefill rewrites slots
    length.. of request 0 and is undone on return, so one DocumentKV serves every method in turn.
    """
    out, tok, pos = [], last_prompt_token, kv.length
    while len(out) < max_new and pos < kv.capacity and not (out and out[-1] in stop_ids):
        batch = Batch(torch.zeros(1, dtype=torch.long), torch.tensor([pos + 1]), torch.tensor([pos]))
        attn = MethodAttention(kv, batch, method, budget, dense_layers, observe)
        tok = int(model.decode(torch.tensor([tok]), torch.tensor([pos]), attn)[0].argmax())
        out.append(tok)
        pos += 1
    kv.truncate(kv.length)
    return out


def kl_and_top1(logits: torch.Tensor, dense_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(dense || method) in nats and top-1 agreement (bool) for logits [W, V]."""
    p_log = torch.log_softmax(dense_logits.float(), -1)
    q_log = torch.log_softmax(logits.float(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl, logits.argmax(-1) == dense_logits.argmax(-1)
