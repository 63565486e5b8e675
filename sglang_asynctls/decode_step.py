"""Whole decode steps on the GPU, composed from the Triton kernels: AsyncTLS two-level sparse decode, its fine
stage, and the baselines (Quest, token-only, dense). Every method has `reference.METHODS`' signature. No host
synchronisation and no data-dependent shape anywhere (shapes follow block_table's NB and the budgets), so a step
can be captured in a CUDA graph.

asynctls, 6 kernels: block_scores -> select_blocks -> token_logits -> group-mean softmax with top-Kt and the slot
lookup (`select_token_slots`; the softmax combine is a launch of its own for groups wider than 8 heads, see
`fine_select_candidates`) -> sparse_decode split-K -> split combine. More candidates than one program selects from
in registers (MAX_FUSED_CANDIDATES: token-only over a whole context, or layers with extra candidate blocks) take
torch ops (`reference`'s) for the positions and the top-Kt.

Fine level: label scores of the candidates (`token_logits` + softmax combine, both split over the candidates so a
few KV groups still fill the GPU), then top-Kt with the slot lookup fused (`select_token_slots`).
"""

from typing import Optional

import torch

from sglang_asynctls import reference
from sglang_asynctls.kernels.block_scores import block_scores
from sglang_asynctls.kernels.candidate_slots import candidate_slots
from sglang_asynctls.kernels.select_blocks import select_blocks
from sglang_asynctls.kernels.select_tokens import MAX_FUSED_CANDIDATES, select_token_slots
from sglang_asynctls.kernels.sparse_decode import sparse_decode
from sglang_asynctls.kernels.token_logits import token_logits
from sglang_asynctls.kernels.token_scores import candidate_scores


# Widest KV group whose softmax combine is folded into the top-Kt kernel (see fine_select_candidates).
FOLD_COMBINE_MAX_GROUP = 8
COMBINES = ("fold", "logits")


def fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates,
                           *, block_size, token_budget, sink_tokens, local_window, sm_scale,
                           out: Optional[torch.Tensor] = None, combine: Optional[str] = None,
                           ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`fine_select` over candidates given as positions [B, Hkv, C] (block_size == 0) or as block ids
    [B, Hkv, Kb] (block_size > 0: all Kb * block_size positions of those blocks, as `candidate_positions`).
    Returns KV slots [B, Hkv, Kt] int32, -1 padded. ahead [B, Hkv, P] int32: also the slots of the next P
    candidates below the cut-off (`select_token_slots`).

    combine, how the group-mean softmax is formed before the top-Kt (`select_token_slots`):
    "fold": `token_logits`, then the top-Kt kernel reads all G logit rows (two launches); "logits": the combine in
    `token_scores`' own launch (three). The fold runs in the one program per KV group: on the H100 at 96k x 8 it
    wins at G = 4 (38.4 vs 43.3 us for the fine stage) and loses at the MLA's G = 20 (64.7 vs 44.5), so by default
    (None) groups of at most FOLD_COMBINE_MAX_GROUP heads fold and wider ones combine in their own launch."""
    if combine is None:
        combine = "fold" if q.shape[1] // channels.shape[0] <= FOLD_COMBINE_MAX_GROUP else "logits"
    assert combine in COMBINES, combine
    kw = dict(block_size=block_size, token_budget=token_budget, sink_tokens=sink_tokens,
              local_window=local_window, out=out, ahead=ahead)
    args = (q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates, sm_scale)
    if combine == "fold":
        logits, stats = token_logits(*args, block_size=block_size)
        return select_token_slots(logits, candidates, req_to_token, req_pool_indices, seq_lens, stats=stats, **kw)
    scores = candidate_scores(*args, block_size=block_size)
    return select_token_slots(scores, candidates, req_to_token, req_pool_indices, seq_lens, **kw)


def fine_select(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                positions: torch.Tensor, *, token_budget: int, sink_tokens: int, local_window: int,
                sm_scale: float, out: Optional[torch.Tensor] = None,
                ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fine stage over candidate positions [B, Hkv, C] (see `reference.fine_select`): [B, Hkv, Kt] int32 slots;
    ahead [B, Hkv, P] int32, when given, gets the slots of the next P candidates (`reference.select_ahead`).

    Up to MAX_FUSED_CANDIDATES candidates one program per KV group selects in registers; beyond (token-only
    over a whole context) torch.topk selects.
    """
    kw = dict(token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window)
    if positions.shape[2] + (ahead.shape[2] if ahead is not None else 0) <= MAX_FUSED_CANDIDATES:
        return fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                      positions, block_size=0, sm_scale=sm_scale, out=out, ahead=ahead, **kw)
    scores = candidate_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                              positions, sm_scale)
    picked = reference.select_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
    slots = reference.positions_to_slots(picked, req_to_token, req_pool_indices)
    if ahead is not None:
        near = reference.select_ahead(scores, positions, seq_lens, token_budget, ahead.shape[2], sink_tokens,
                                      local_window)
        ahead.copy_(reference.positions_to_slots(near, req_to_token, req_pool_indices))
    return slots if out is None else out.copy_(slots)


def coarse_select(q, kmin, kmax, block_table, seq_lens, *, block_size, block_budget, sink_tokens,
                  local_window, bound_slack: float = 1.0, group_score: str = "sum") -> torch.Tensor:
    """Coarse stage (see `reference.coarse_select`): [B, Hkv, Kb] int32 block ids (M_t), ascending id order."""
    scores = block_scores(q, kmin, kmax, block_table, seq_lens, block_size, bound_slack, group_score)
    return select_blocks(scores, seq_lens, block_size, block_budget, sink_tokens, local_window)


def asynctls_select(q, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table, labels, label_scale,
                    channels, *, block_size, block_budget, token_budget, sink_tokens, local_window, sm_scale,
                    candidate_blocks: Optional[torch.Tensor] = None, bound_slack: float = 1.0,
                    group_score: str = "sum", ahead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Both selection levels: [B, Hkv, Kt] int32 KV slots (-1 padded) that `asynctls_decode` attends over;
    ahead [B, Hkv, P] int32, when given, gets the slots of the next P candidates below the cut-off."""
    if candidate_blocks is None:
        candidate_blocks = coarse_select(q, kmin, kmax, block_table, seq_lens, block_size=block_size,
                                         block_budget=block_budget, sink_tokens=sink_tokens,
                                         local_window=local_window, bound_slack=bound_slack,
                                         group_score=group_score)
    kw = dict(token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window, sm_scale=sm_scale,
              ahead=ahead)
    if candidate_blocks.shape[2] * block_size <= MAX_FUSED_CANDIDATES:
        return fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                      candidate_blocks.contiguous(), block_size=block_size, **kw)
    positions = reference.candidate_positions(candidate_blocks, seq_lens, block_size)
    return fine_select(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, positions, **kw)


def asynctls_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                    labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                    local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, bound_slack: float = 1.0,
                    group_score: str = "sum", out_rows: Optional[torch.Tensor] = None,
                    host_cache=None) -> torch.Tensor:
    """Two-level sparse decode (see `reference.asynctls_decode`). q: [B, Hq, D] -> o: [B, Hq, Dv] in q's dtype.
    With out and out_rows [B] bool, only the flagged rows of out are written (the backend's long requests).
    host_cache: for a KV pool with a host tier, host_cache(slots, blocks, ahead) -> `sparse_decode`'s cache tuple
    (offload/host_cache.py `LayerCache`; see `reference.asynctls_decode`)."""
    ahead_rows = getattr(host_cache, "ahead_rows", 0)
    if host_cache is not None and candidate_blocks is None:  # the host tier counts |M_t n M_t-1| from M_t
        candidate_blocks = coarse_select(q, kmin, kmax, block_table, seq_lens, block_size=block_size,
                                         block_budget=block_budget, sink_tokens=sink_tokens,
                                         local_window=local_window, bound_slack=bound_slack,
                                         group_score=group_score)
    ahead = (torch.empty(q.shape[0], k_buffer.shape[1], ahead_rows, dtype=torch.int32, device=q.device)
             if ahead_rows else None)
    slots = asynctls_select(q, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table, labels,
                            label_scale, channels, block_size=block_size, block_budget=block_budget,
                            token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window,
                            sm_scale=sm_scale, candidate_blocks=candidate_blocks, bound_slack=bound_slack,
                            group_score=group_score, ahead=ahead)
    cache = host_cache(slots, candidate_blocks, ahead) if host_cache is not None else None
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale, out=out, out_rows=out_rows, cache=cache)


def quest_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                 labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                 local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quest (see `reference.quest_decode`): attention over every token of the Kb kept blocks."""
    if candidate_blocks is None:
        candidate_blocks = coarse_select(q, kmin, kmax, block_table, seq_lens, block_size=block_size,
                                         block_budget=block_budget, sink_tokens=sink_tokens,
                                         local_window=local_window)
    slots = candidate_slots(candidate_blocks.contiguous(), req_to_token, req_pool_indices, seq_lens, block_size)
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale, out=out)


def _all_blocks(seq_lens: torch.Tensor, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """[B, Hkv, NB] block ids 0..NB-1 (a broadcast view): every position < NB * BS is a candidate."""
    ids = torch.arange(num_blocks, dtype=torch.int32, device=seq_lens.device)
    return ids.expand(len(seq_lens), num_kv_heads, num_blocks)


def token_only_decode(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                      labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                      local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoubleSparse-style (see `reference.token_only_decode`): label scores over every token (positions up to
    NB * BS, so no host sync for the longest request), top-Kt, exact attention."""
    hkv = k_buffer.shape[1]
    nb = block_table.shape[1]
    kw = dict(token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window, sm_scale=sm_scale)
    if nb * block_size <= MAX_FUSED_CANDIDATES:
        slots = fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                       _all_blocks(seq_lens, hkv, nb), block_size=block_size, **kw)
    else:
        slots = _token_only_topk(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, nb,
                                 block_size, **kw)
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale, out=out)


def _token_only_topk(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, num_blocks,
                     block_size, *, token_budget, sink_tokens, local_window, sm_scale) -> torch.Tensor:
    """Scores of all positions < NB * BS (candidate c is position c), then torch.topk: too many candidates for
    one program's registers."""
    b, hkv = q.shape[0], channels.shape[0]
    max_len = num_blocks * block_size
    scores = candidate_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                              _all_blocks(seq_lens, hkv, num_blocks), sm_scale, block_size=block_size)
    pos = torch.arange(max_len, device=q.device)
    lens = seq_lens[:, None].long()
    forced = (pos[None] < lens) & ((pos[None] < sink_tokens) | (pos[None] >= lens - local_window))
    top = torch.topk(scores.masked_fill(forced[:, None, :], float("inf")), min(token_budget, max_len), dim=2)
    # positions past the pool row only carry -inf scores; clamp so the gather stays in bounds
    slots = req_to_token[req_pool_indices.long()[:, None, None], top.indices.clamp(max=req_to_token.shape[1] - 1)]
    slots = torch.where(top.values > float("-inf"), slots, -1).to(torch.int32)
    if slots.shape[2] < token_budget:
        slots = torch.cat([slots, slots.new_full((b, hkv, token_budget - slots.shape[2]), -1)], dim=2)
    return slots


def dense_slots(req_to_token, req_pool_indices, seq_lens, num_kv_heads: int, max_len: int) -> torch.Tensor:
    """[B, Hkv, max_len] int32 slots of every position (-1 beyond each request's length)."""
    pos = torch.arange(max_len, device=seq_lens.device)
    slots = req_to_token[req_pool_indices.long()[:, None], pos.clamp(max=req_to_token.shape[1] - 1)[None]]
    slots = torch.where(pos[None] < seq_lens[:, None].long(), slots.int(), -1).to(torch.int32)
    return slots[:, None, :].expand(-1, num_kv_heads, -1)


def dense_method(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kmin, kmax, block_table,
                 labels, label_scale, channels, *, block_size, block_budget, token_budget, sink_tokens,
                 local_window, sm_scale, candidate_blocks: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense decode over every position < NB * BS with `sparse_decode` (the benchmark also times SGLang's)."""
    slots = dense_slots(req_to_token, req_pool_indices, seq_lens, k_buffer.shape[1],
                        block_table.shape[1] * block_size)
    return sparse_decode(q, k_buffer, v_buffer, slots, sm_scale, out=out)


# name -> GPU decode method, signatures as reference.METHODS
METHODS = {"dense": dense_method, "quest": quest_decode, "token_only": token_only_decode,
           "asynctls": asynctls_decode}
