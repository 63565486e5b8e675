"""Pure-torch reference of every AsyncTLS kernel: the spec the Triton kernels and the tests are held to.

Notations for shapes (SGLang/FlashInfer vocabulary):
    B   batch (requests)              Hq  num_qo_heads        Hkv num_kv_heads      G = Hq // Hkv
    D   head_dim of keys              Dv  head_dim of values  S   KV slots in the pool
    BS  block_size                    NB  max blocks per request (ceil(max seq_len / BS))
    Kb  block_budget (k_b)            Kt  token_budget (k_t)  Dc  label_channels (d_c)
KV layout is SGLang's: k_buffer [S, Hkv, D], v_buffer [S, Hkv, Dv], req_to_token [max_reqs, max_ctx] -> slot.
MLA decode is MQA over the latent: Hkv = 1, D = kv_lora_rank + rope dims, v_buffer = k_buffer[..., :Dv].

Semantics of the two-level selection (per request and KV group):
    blocks   block j holds positions [j*BS, (j+1)*BS); it is "complete" when (j+1)*BS <= seq_len and only
             complete blocks have Kmin/Kmax. Forced blocks (always kept): blocks holding a sink position
             (< sink_tokens), a window position (>= seq_len - local_window) or the open last block.
    coarse   score_j = sum_{h in group} (q+_h . Kmax_j + q-_h . Kmin_j) — an upper bound on max_t q_h.k_t;
             keep the top Kb blocks, forced blocks first. With bound_slack s < 1 the half-range term is scaled:
             score_j = sum_h (q_h . C_j + s |q_h| . R_j), C = (Kmax + Kmin) / 2, R = (Kmax - Kmin) / 2
             (s = 1 is the bound above, s = 0 the block centre); still one GEMM over Kmax/Kmin with the query
             pair q_hi = (q + s|q|) / 2, q_lo = (q - s|q|) / 2 in place of q+, q-. With group_score "max" the
             group's heads are combined by max_h instead of sum_h (at s = 1 an upper bound on max_{h,t} q_h.k_t):
             one retrieval head's peak is not drowned by the other heads' envelopes.
    fine     token score = mean_{h in group} softmax_t(q_h[ch] . label_t / sqrt(D)) over the kept blocks' tokens,
             label_t = INT4-dequantized k_t[ch]; sink and window tokens are forced; keep the top Kt tokens.
    attend   exact softmax attention of every head in the group over the kept tokens' full K/V.
Padding: selected block / position / slot lists are padded with -1; scores of invalid entries are -inf.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


NEG_INF = float("-inf")
POS_INF = float("inf")


def _f(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float32 for 16-bit inputs, the input's own dtype for float32/float64."""
    return x.float() if x.element_size() < 4 or not x.is_floating_point() else x

# ---------------------------------------------------------------------------------------------- index build


def block_minmax(k_buffer: torch.Tensor, block_slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the keys of complete blocks.

    k_buffer: [S, Hkv, D]; block_slots: [M, BS] int (the KV slots of each block's tokens).
    Returns kmin, kmax: [M, Hkv, D] in k_buffer's dtype.
    """
    keys = k_buffer[block_slots.long()]  # [M, BS, Hkv, D]
    return keys.amin(dim=1), keys.amax(dim=1)


def request_block_slots(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, block_ids: torch.Tensor,
                        block_size: int) -> torch.Tensor:
    """KV slots of blocks: block_ids [M] of requests req_pool_indices [M] -> [M, BS] slots."""
    pos = block_ids.long()[:, None] * block_size + torch.arange(block_size, device=block_ids.device)
    return req_to_token[req_pool_indices.long()[:, None], pos]


def quantize_labels(keys: torch.Tensor, channels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """INT4 heavy-channel labels of keys.

    keys: [N, Hkv, D]; channels: [Hkv, Dc] int (Dc even).
    Returns packed [N, Hkv, Dc // 2] uint8 (channel 2i in the low nibble, 2i+1 in the high nibble, each stored
    as q + 8 with q in [-7, 7]) and scale [N, Hkv] float32 with label = q * scale; |label - k| <= scale / 2.
    """
    n, hkv, _ = keys.shape
    idx = channels.long()[None].expand(n, -1, -1)
    sel = torch.gather(keys.float(), 2, idx)  # [N, Hkv, Dc]
    scale = sel.abs().amax(dim=2) / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(sel / safe[..., None]), -7, 7).to(torch.int16) + 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    return packed, scale


def append_decode_index(k_buffer: torch.Tensor, new_loc: torch.Tensor, seq_lens: torch.Tensor,
                        channels: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor,
                        kmin: torch.Tensor, kmax: torch.Tensor, block_size: int,
                        rows: Optional[torch.Tensor] = None) -> None:
    """Decode-time index append, in place: label the key each request just wrote and fold it into its block's
    Kmin/Kmax (a block's row restarts when the token opens it, so a reused row never keeps a stale bound).

    k_buffer [S, Hkv, D] (keys already written); new_loc [B] their slots; seq_lens [B] lengths including them;
    channels [Hkv, Dc]; labels [S, Hkv, Dc // 2] uint8 and label_scale [S, Hkv] written at new_loc;
    kmin/kmax [P, Hkv, D], row = slot // block_size (a page), or rows [B] when given (per-request rows).
    """
    loc = new_loc.long()
    k_new = k_buffer[loc]
    packed, scale = quantize_labels(k_new, channels)
    labels[loc] = packed
    label_scale[loc] = scale
    page = torch.div(loc, block_size, rounding_mode="floor") if rows is None else rows.long()
    opens = ((seq_lens.long() - 1) % block_size == 0)[:, None, None]
    kmin[page] = torch.where(opens, k_new, torch.minimum(kmin[page], k_new))
    kmax[page] = torch.where(opens, k_new, torch.maximum(kmax[page], k_new))


def index_extend(k_buffer: torch.Tensor, page_slots: torch.Tensor, page_ids: torch.Tensor,
                 label_slots: torch.Tensor, channels: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor,
                 kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    """Prefill-time index update, in place: label the new keys and recompute the bounds of the pages they fall in.

    k_buffer [S, Hkv, D] (keys already written); page_slots [M, BS] int64 the slots of each touched page (-1 past
    its request's length; every page has one); page_ids [M] their kmin/kmax rows; label_slots [M, BS] the slots
    to label (page_slots where the token is new, else -1); channels, labels, label_scale as
    `append_decode_index`.
    """
    valid = (page_slots >= 0)[:, :, None, None]
    keys = k_buffer[page_slots.clamp(min=0)]  # [M, BS, Hkv, D]
    big = torch.finfo(keys.dtype).max
    kmin[page_ids] = torch.where(valid, keys, big).amin(dim=1)
    kmax[page_ids] = torch.where(valid, keys, -big).amax(dim=1)
    new = label_slots[label_slots >= 0]
    packed, scale = quantize_labels(k_buffer[new], channels)
    labels[new] = packed
    label_scale[new] = scale


def dequantize_labels(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed [N, Hkv, Dc // 2] uint8, scale [N, Hkv] -> labels [N, Hkv, Dc] float32."""
    p = packed.to(torch.int16)
    q = torch.stack([(p & 0xF) - 8, (p >> 4) - 8], dim=-1).flatten(-2)
    return q.float() * scale[..., None].float()


# ---------------------------------------------------------------------------------------------- coarse level


def num_complete_blocks(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(seq_lens, block_size, rounding_mode="floor")


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, bound_slack: float = 1.0,
                 group_score: str = "sum") -> torch.Tensor:
    """Upper-bound scores of complete blocks in GEMM form (bound_slack 1), or the slack-scaled score (< 1).

    q: [B, Hq, D]; kmin, kmax: [E, Hkv, D] index entries; block_table: [B, NB] int entry of each block
    (entries of incomplete blocks are ignored). Returns [B, Hkv, NB] float32, -inf where the block is incomplete.
    bound_slack s in [0, 1] weighs each block's half-range, group_score ("sum" | "max") combines the group's
    heads (module docstring): the bound is loosest in the channels where prose blocks all span nearly the same
    range, and a sum over heads lets the group's other heads outvote a retrieval head.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = _f(q).view(b, hkv, hq // hkv, d)
    # (q +- s|q|) / 2: at s = 1 exactly q+ = max(q, 0) and q- = min(q, 0)
    q_pos, q_neg = (qg + bound_slack * qg.abs()) / 2, (qg - bound_slack * qg.abs()) / 2
    entries = block_table.long().clamp(min=0)
    kmax_b = _f(kmax[entries])  # [B, NB, Hkv, D]
    kmin_b = _f(kmin[entries])
    if group_score == "sum":  # the sum over heads commutes with the dot: one GEMV per group, [B, Hkv, D]
        q_pos, q_neg = q_pos.sum(dim=2), q_neg.sum(dim=2)
        scores = torch.einsum("bhd,bnhd->bhn", q_pos, kmax_b) + torch.einsum("bhd,bnhd->bhn", q_neg, kmin_b)
    elif group_score == "max":  # a [G, D] x [D, NB] GEMM per group, then the max over its G heads
        scores = (torch.einsum("bhgd,bnhd->bhgn", q_pos, kmax_b)
                  + torch.einsum("bhgd,bnhd->bhgn", q_neg, kmin_b)).amax(dim=2)
    else:
        raise ValueError(f"group_score must be 'sum' or 'max' (got {group_score!r})")
    nb = block_table.shape[1]
    complete = torch.arange(nb, device=q.device)[None] < num_complete_blocks(seq_lens, block_size)[:, None]
    return scores.masked_fill(~complete[:, None, :], NEG_INF)


def quest_block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quest's elementwise form: sum_h sum_d max(q_d * Kmax_d, q_d * Kmin_d). Equal to `block_scores`."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = _f(q).view(b, hkv, hq // hkv, 1, d)
    entries = block_table.long().clamp(min=0)
    kmax_b = _f(kmax[entries]).permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, NB, D]
    kmin_b = _f(kmin[entries]).permute(0, 2, 1, 3)[:, :, None]
    scores = torch.maximum(qg * kmax_b, qg * kmin_b).sum(dim=-1).sum(dim=2)
    nb = block_table.shape[1]
    complete = torch.arange(nb, device=q.device)[None] < num_complete_blocks(seq_lens, block_size)[:, None]
    return scores.masked_fill(~complete[:, None, :], NEG_INF)


def forced_block_mask(seq_lens: torch.Tensor, num_blocks: int, block_size: int, sink_tokens: int,
                      local_window: int) -> torch.Tensor:
    """[B, NB] bool: blocks holding sink positions, window positions, or the open last block."""
    j = torch.arange(num_blocks, device=seq_lens.device)[None]
    start, end = j * block_size, (j + 1) * block_size
    lens = seq_lens[:, None]
    exists = start < lens
    sink = start < sink_tokens
    window = end > lens - local_window
    open_block = end > lens
    return exists & (sink | window | open_block)


def select_blocks(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int, block_budget: int,
                  sink_tokens: int, local_window: int) -> torch.Tensor:
    """Top-Kb blocks per KV group, forced blocks always in.

    scores: [B, Hkv, NB] from `block_scores`. Returns block ids [B, Hkv, Kb] int32 in descending priority
    (forced first), -1 where fewer than Kb blocks exist.
    """
    b, hkv, nb = scores.shape
    forced = forced_block_mask(seq_lens, nb, block_size, sink_tokens, local_window)
    pri = scores.masked_fill(forced[:, None, :], POS_INF)
    k = min(block_budget, nb)
    top = torch.topk(pri, k, dim=2)
    ids = torch.where(top.values > NEG_INF, top.indices, torch.full_like(top.indices, -1)).to(torch.int32)
    if k < block_budget:
        ids = torch.cat([ids, ids.new_full((b, hkv, block_budget - k), -1)], dim=2)
    return ids

# ---------------------------------------------------------------------------------------------- fine level


def candidate_positions(block_ids: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token positions of selected blocks: [B, Hkv, Kb] -> [B, Hkv, Kb * BS] int64, -1 where invalid."""
    off = torch.arange(block_size, device=block_ids.device)
    pos = block_ids.long()[..., None] * block_size + off
    valid = (block_ids[..., None] >= 0) & (pos < seq_lens[:, None, None, None])
    return torch.where(valid, pos, torch.full_like(pos, -1)).flatten(2)


def token_scores(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, positions: torch.Tensor,
                 sm_scale: float) -> torch.Tensor:
    """Group-mean softmax of label scores over the candidate tokens.

    q: [B, Hq, D]; labels: [S, Hkv, Dc // 2] uint8; label_scale: [S, Hkv]; channels: [Hkv, Dc];
    positions: [B, Hkv, C] (-1 = invalid). Returns [B, Hkv, C] float32 in [0, 1], -inf where invalid.
    """
    b, hq, d = q.shape
    hkv, dc = channels.shape
    g = hq // hkv
    idx = channels.long()[None, :, None, :].expand(b, hkv, g, dc)
    q_lab = torch.gather(_f(q).view(b, hkv, g, d), 3, idx).float()  # [B, Hkv, G, Dc]
    valid = positions >= 0
    slots = req_to_token[req_pool_indices.long()[:, None, None], positions.clamp(min=0)].long()  # [B, Hkv, C]
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    lab = dequantize_labels(labels[slots, heads], label_scale[slots, heads])  # [B, Hkv, C, Dc]
    logits = torch.einsum("bhgc,bhnc->bhgn", q_lab, lab) * sm_scale
    logits = logits.masked_fill(~valid[:, :, None, :], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=2)
    return probs.masked_fill(~valid, NEG_INF)


def select_tokens(scores: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, token_budget: int,
                  sink_tokens: int, local_window: int) -> torch.Tensor:
    """Top-Kt candidate positions per KV group, sink and window positions forced.

    scores, positions: [B, Hkv, C]. Returns positions [B, Hkv, Kt] int64, -1 padded.
    """
    lens = seq_lens[:, None, None]
    forced = (positions >= 0) & ((positions < sink_tokens) | (positions >= lens - local_window))
    pri = scores.masked_fill(forced, POS_INF)
    k = min(token_budget, pri.shape[2])
    top = torch.topk(pri, k, dim=2)
    picked = torch.gather(positions, 2, top.indices)
    picked = torch.where(top.values > NEG_INF, picked, torch.full_like(picked, -1))
    if k < token_budget:
        picked = torch.cat([picked, picked.new_full((*picked.shape[:2], token_budget - k), -1)], dim=2)
    return picked


def select_ahead(scores: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor, token_budget: int,
                 ahead_rows: int, sink_tokens: int, local_window: int) -> torch.Tensor:
    """The next `ahead_rows` candidates below the top-Kt cut-off: ranks Kt+1 .. Kt+P of `select_tokens`' priority,
    the likeliest newcomers of the next step's selection (what the host-row prefetch copies,
    offload/host_cache.py). scores, positions: [B, Hkv, C]. Returns positions [B, Hkv, P] int64, -1 padded."""
    wide = select_tokens(scores, positions, seq_lens, token_budget + ahead_rows, sink_tokens, local_window)
    return wide[..., token_budget:]


def positions_to_slots(positions: torch.Tensor, req_to_token: torch.Tensor,
                       req_pool_indices: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, K] positions (-1 padded) -> [B, Hkv, K] int32 KV slots (-1 padded)."""
    slots = req_to_token[req_pool_indices.long()[:, None, None], positions.clamp(min=0)]
    return torch.where(positions >= 0, slots.long(), torch.full_like(positions, -1)).to(torch.int32)

# ---------------------------------------------------------------------------------------------- attention


def sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, token_slots: torch.Tensor,
                  sm_scale: float, cache: tuple = None) -> torch.Tensor:
    """Exact attention of each query head over its KV group's selected slots.

    q: [B, Hq, D]; k_buffer: [S, Hkv, D]; v_buffer: [S, Hkv, Dv]; token_slots: [B, Hkv, K] int (-1 = skip).
    cache: (cache_k [N, D], cache_v [N, Dv], cache_ref [B, Hkv, K] from `offload.reference.host_cache_lookup`):
    a row with cache_ref c >= 0 is read from cache row c; one with -(c + 2) is read from its slot and copied into
    cache row c (when v_buffer is a view of k_buffer, cache_v is cache_k and only K rows are kept).
    Returns o: [B, Hq, Dv] in q's dtype (accumulated in float32).
    """
    b, hq, d = q.shape
    hkv = k_buffer.shape[1]
    g = hq // hkv
    valid = token_slots >= 0
    slots = token_slots.long().clamp(min=0)
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    k_rows, v_rows = k_buffer[slots, heads], v_buffer[slots, heads]  # [B, Hkv, K, D], [B, Hkv, K, Dv]
    if cache is not None:
        v_is_k = v_buffer.data_ptr() == k_buffer.data_ptr()
        k_rows, v_rows = _through_cache(k_rows, v_rows, valid, *cache, v_is_k=v_is_k)
    k, v = _f(k_rows), _f(v_rows)
    logits = torch.einsum("bhgd,bhkd->bhgk", _f(q).view(b, hkv, g, d), k) * sm_scale
    logits = logits.masked_fill(~valid[:, :, None, :], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgk,bhkv->bhgv", probs, v)
    return o.reshape(b, hq, -1).to(q.dtype)


def _through_cache(k_rows, v_rows, valid, cache_k, cache_v, cache_ref, v_is_k: bool):
    """K/V rows as the host-row cache serves them (hits from the cache, fills written into it)."""
    hit = valid & (cache_ref >= 0)
    fill = valid & (cache_ref <= -2)
    line = torch.where(hit, cache_ref, -cache_ref - 2).long()
    k_rows = torch.where(hit[..., None], cache_k[line.clamp(min=0)], k_rows)
    cache_k[line[fill]] = k_rows[fill]
    if v_is_k:
        return k_rows, k_rows[..., :v_rows.shape[-1]]
    v_rows = torch.where(hit[..., None], cache_v[line.clamp(min=0)], v_rows)
    cache_v[line[fill]] = v_rows[fill]
    return k_rows, v_rows


def all_positions(seq_lens: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hkv, max_len] positions 0..len-1 of every request, -1 padded."""
    n = int(seq_lens.max())
    pos = torch.arange(n, device=seq_lens.device)[None].expand(len(seq_lens), n)
    pos = torch.where(pos < seq_lens[:, None], pos, torch.full_like(pos, -1))
    return pos[:, None, :].expand(-1, num_kv_heads, -1).contiguous()


def dense_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale) -> torch.Tensor:
    """Dense decode attention over every token of every request (the baseline all methods are judged against)."""
    pos = all_positions(seq_lens, k_buffer.shape[1])
    return sparse_decode(q, k_buffer, v_buffer, positions_to_slots(pos, req_to_token, req_pool_indices),
                         sm_scale)

# ---------------------------------------------------------------------------------------------- composed methods


def coarse_select(q, kmin, kmax, block_table, seq_lens, *, block_size, block_budget, sink_tokens,
                  local_window, bound_slack: float = 1.0, group_score: str = "sum") -> torch.Tensor:
    """Coarse stage: [B, Hkv, Kb] block ids (M_t)."""
    scores = block_scores(q, kmin, kmax, block_table, seq_lens, block_size, bound_slack, group_score)
    return select_blocks(scores, seq_lens, block_size, block_budget, sink_tokens, local_window)


def fine_select(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, positions, *,
                token_budget, sink_tokens, local_window, sm_scale, ahead_rows: int = 0):
    """Fine stage over candidate positions [B, Hkv, C]: [B, Hkv, Kt] int32 slots; with ahead_rows P > 0 the pair
    (slots, slots of the P candidates below the cut-off [B, Hkv, P], `select_ahead`)."""
    scores = token_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, positions, sm_scale)
    picked = select_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
    slots = positions_to_slots(picked, req_to_token, req_pool_indices)
    if not ahead_rows:
        return slots
    near = select_ahead(scores, positions, seq_lens, token_budget, ahead_rows, sink_tokens, local_window)
    return slots, positions_to_slots(near, req_to_token, req_pool_indices)


def asynctls_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                    labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                    local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None,
                    bound_slack: float = 1.0, group_score: str = "sum", host_cache=None) -> torch.Tensor:
    """Two-level sparse decode. candidate_blocks [B, Hkv, Kb] (e.g. the previous step's M_{t-1}, as the offload
    engine uses) replaces this step's coarse selection when given; bound_slack, group_score: `block_scores`.
    host_cache: for a KV pool with a host tier, host_cache(slots, blocks, ahead) -> `sparse_decode`'s cache tuple
    (offload/host_cache.py `LayerCache`): blocks = M_t, ahead = the slots of the host_cache.ahead_rows candidates
    below the cut-off (None when it is 0), which it fetches into the cache for the next step."""
    if candidate_blocks is None:
        candidate_blocks = coarse_select(q, kmin, kmax, block_table, seq_lens, block_size=block_size,
                                         block_budget=block_budget, sink_tokens=sink_tokens,
                                         local_window=local_window, bound_slack=bound_slack,
                                         group_score=group_score)
    positions = candidate_positions(candidate_blocks, seq_lens, block_size)
    ahead_rows = getattr(host_cache, "ahead_rows", 0)
    slots = fine_select(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, positions,
                        token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window,
                        sm_scale=sm_scale, ahead_rows=ahead_rows)
    slots, ahead = slots if ahead_rows else (slots, None)
    cache = host_cache(slots, candidate_blocks, ahead) if host_cache is not None else None
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale, cache=cache)


def quest_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                 labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                 local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quest: block selection only; attends over every token of the Kb kept blocks (labels unused)."""
    if candidate_blocks is None:
        candidate_blocks = coarse_select(q, kmin, kmax, block_table, seq_lens, block_size=block_size,
                                         block_budget=block_budget, sink_tokens=sink_tokens,
                                         local_window=local_window)
    positions = candidate_positions(candidate_blocks, seq_lens, block_size)
    return sparse_decode(q, k_buffer, v_buffer, positions_to_slots(positions, req_to_token, req_pool_indices),
                         sm_scale)


def token_only_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                      labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                      local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoubleSparse-style: label scores over every token, top-Kt, exact attention (block index unused)."""
    positions = all_positions(seq_lens, k_buffer.shape[1])
    slots = fine_select(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, positions,
                        token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window,
                        sm_scale=sm_scale)
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale)


def dense_method(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                 labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                 local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`dense_decode` with the common method signature (index and budgets unused)."""
    return dense_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale)


# name -> decode method, all with one signature, for benchmarks and fidelity runs
METHODS = {"dense": dense_method, "quest": quest_decode, "token_only": token_only_decode,
           "asynctls": asynctls_decode}


def build_index(k_buffer, req_to_token, req_pool_indices, seq_lens, channels, block_size):
    """Index of whole requests, as prefill writes it: complete blocks get consecutive entries.

    Returns kmin, kmax [E, Hkv, D], block_table [B, NB] int32 (-1 for incomplete blocks), labels
    [S, Hkv, Dc // 2] uint8 and label_scale [S, Hkv] for every slot of the pool.
    """
    nblk = num_complete_blocks(seq_lens, block_size)
    nb = max(1, -(-int(seq_lens.max()) // block_size))
    table = torch.full((len(seq_lens), nb), -1, dtype=torch.int32, device=seq_lens.device)
    reqs, blocks = [], []
    for i, n in enumerate(nblk.tolist()):
        table[i, :n] = torch.arange(len(blocks), len(blocks) + n, dtype=torch.int32)
        reqs += [int(req_pool_indices[i])] * n
        blocks += list(range(n))
    dev = seq_lens.device
    slots = request_block_slots(req_to_token, torch.tensor(reqs, dtype=torch.long, device=dev),
                                torch.tensor(blocks, dtype=torch.long, device=dev), block_size)
    kmin, kmax = block_minmax(k_buffer, slots.reshape(-1, block_size))
    labels, label_scale = quantize_labels(k_buffer, channels)
    return kmin, kmax, table, labels, label_scale


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
